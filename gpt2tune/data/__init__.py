"""Data: read sources (`sources`), clean text (`clean`), build token datasets and batches (`dataset`)."""
