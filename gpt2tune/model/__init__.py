"""Model: resolve a name to a folder (`resolve`), load or build tokenizers (`tokenizer`) and models (`build`)."""
