"""Load on `edgediff serve`: N clients, each sending M txt2img requests one after another through a real
AUTOMATIC1111 client (webuiapi), against a server started here on 127.0.0.1 (the embedded model by default).

    python benchmarks/serve_load.py                          # 4 clients x 5 requests, 64 px, 8 steps
    python benchmarks/serve_load.py --clients 8 --requests 10 --model ./sd15-onnx --size 512 --steps 20

Reports latency percentiles (request sent to response decoded), throughput (images per second of wall time) and
failures (the target is none), with the machine, in benchmarks/results/serve_load.{json,md}. One job runs at a time
(the server's worker), so latency grows with the number of clients while throughput stays that of one pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPTS = ["a red circle on a blue background", "a small green triangle at the top, yellow background",
           "an orange diamond on the left on a black background", "a large purple star in the centre"]  # fmt: skip


def run(clients: int, requests: int, size: int, steps: int, model: str | None) -> dict:
    from edgediff.runtime.serve import create_app
    from edgediff.runtime.serve.app import serve_in_thread

    app = create_app([model] if model else [], max_queue=max(8, clients))
    with serve_in_thread(app) as port:
        return _load(port, clients, requests, size, steps, model)


def _load(port: int, clients: int, requests: int, size: int, steps: int, model: str | None) -> dict:
    import webuiapi

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                r = api.txt2img(prompt=PROMPTS[(k + i) % len(PROMPTS)], seed=1000 * k + i, steps=steps, width=size,
                                height=size, sampler_name="Euler a")  # fmt: skip
                ok = len(r.images) == 1 and r.info["all_seeds"] == [1000 * k + i]
                error = None if ok else "wrong response"
            except Exception as e:  # counted, not raised: the report says how many and why
                error = f"{type(e).__name__}: {e}"[:200]
            with lock:
                if error:
                    failures.append(error)
                else:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "clients": clients, "requests_per_client": requests, "size": size, "steps": steps,
        "model": model or "embedded shapes model", "completed": len(latencies), "failures": len(failures),
        "failure_examples": failures[:5], "wall_s": wall, "images_per_s": len(latencies) / wall,
        "latency_s": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                      "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "min": float(lat.min())},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from edgediff.runtime.bench import machine_info
    from provenance import command_and_date

    result = run(args.clients, args.requests, args.size, args.steps, args.model)
    report = {"machine": machine_info(), **command_and_date(__file__, argv), "result": result}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(report, indent=1) + "\n")
    m, r = report["machine"], result
    lat = r["latency_s"]
    md = [
        f"# `edgediff serve` under load: {r['clients']} clients x {r['requests_per_client']} txt2img requests",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs ({', '.join(m['flags'])}), "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {m['os']}.",
        f"Run: `{report['command']}` on {report['date']}; model: {r['model']}, {r['size']} px, {r['steps']} steps "
        "Euler a, through webuiapi 0.9.17 on 127.0.0.1, one job at a time on the server.",
        "",
        "| completed | failures | wall (s) | images/s | latency p50 (s) | p90 | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['completed']} | {r['failures']} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} | {lat['p50']:.2f} | "
        f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} |",
    ]
    if r["failure_examples"]:
        md += ["", "Failures: " + "; ".join(r["failure_examples"])]
    (RESULTS / "serve_load.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
