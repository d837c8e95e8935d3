"""CTranslate2 in a process of its own, for `bench/run.py`'s decode rows.

CTranslate2 and PyTorch each bring their own OpenMP runtime (two copies of libgomp); two
runtimes in one process is not how either engine is used, and in some runs on the 2-core EPYC both
decoded slower once CTranslate2 had run beside torch. So the model is converted in the benchmark's
process and CTranslate2 decodes here, one request per line on stdin:

    {"prompt": [ids], "new": 128, "bs": 1, "sample": false}

and answers one line on stdout: {"ids": [[...], ...], "tps": wall tok/s, "cpu_tps": tok per CPU-s},
timed around `generate_batch` alone, as the other sides are timed around their decode call.

    python bench/ct2_worker.py MODEL_DIR COMPUTE_TYPE THREADS
"""

import json
import sys
import time

import ctranslate2


def main() -> None:
    model_dir, compute_type, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type, intra_threads=threads)
    print(json.dumps({"version": ctranslate2.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = [[f"<{i}>" for i in req["prompt"]]] * req["bs"]
        t, c = time.perf_counter(), time.process_time()
        res = gen.generate_batch(start, max_length=req["new"], min_length=req["new"], include_prompt_in_result=False,
                                 sampling_topk=50 if req["sample"] else 1)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        ids = [r.sequences_ids[0] for r in res]
        n = sum(map(len, ids))
        print(json.dumps({"ids": ids, "tps": n / dt, "cpu_tps": n / max(dc, 1e-9)}), flush=True)


if __name__ == "__main__":
    main()
