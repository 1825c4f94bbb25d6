"""DeepSparse worker: runs INSIDE the DeepSparse virtual env (Python 3.11, deepsparse 1.8.0, onnx
1.14, numpy<2), never in the main env. It must import nothing from sparse_runtime.

Protocol: one JSON request on stdin; one line ``@@SPARSE-RUNTIME-RESULT@@ {json}`` on stdout (DeepSparse
prints banners and logs of its own, so the result line is tagged). Actions:

- ``{"action": "info"}`` -> version, CPU ISA as DeepSparse sees it, licence text.
- ``{"action": "run", "model": PATH, "batch_size": 1, "num_cores": N, "inputs": {name: npy path},
  "outputs_dir": DIR, "repeats": 0}`` -> compiles an engine on a COPY of the model (DeepSparse
  rewrites the .onnx it is given), reports ``fraction_of_supported_ops``, runs the inputs (if any)
  and writes each output as ``DIR/<i>.npy``; with ``repeats`` it also times runs.
"""
import json
import os
import shutil
import sys
import tempfile
import time

TAG = "@@SPARSE-RUNTIME-RESULT@@"
os.environ["NM_DISABLE_ANALYTICS"] = "1"


def _info():
    import deepsparse
    from deepsparse import cpu

    arch = cpu.cpu_architecture()
    return {"deepsparse": deepsparse.__version__, "python": sys.version.split()[0],
            "isa": getattr(arch, "isa", None), "vnni": getattr(arch, "vnni", None),
            "cores": getattr(arch, "num_available_physical_cores", None),
            "licence": "DeepSparse Community License: evaluation in development and testing only, not production"}


def _run(req):
    import numpy as np
    from deepsparse import Engine

    tmp = tempfile.mkdtemp(prefix="ds-worker-")
    try:
        src = req["model"]
        copy = os.path.join(tmp, os.path.basename(src))
        shutil.copy2(src, copy)
        data = src + "_data"
        if os.path.exists(data):
            shutil.copy2(data, copy + "_data")
        t0 = time.perf_counter()
        eng = Engine(copy, batch_size=int(req.get("batch_size", 1)), num_cores=req.get("num_cores"))
        compile_s = time.perf_counter() - t0
        res = {"fraction_of_supported_ops": float(eng.fraction_of_supported_ops), "compile_seconds": compile_s,
               "input_names": list(eng.input_names), "output_names": list(eng.output_names)}
        inputs = req.get("inputs") or {}
        if inputs:
            feeds = [np.ascontiguousarray(np.load(inputs[n])) for n in eng.input_names]
            outs = eng.run(feeds)
            od = req["outputs_dir"]
            os.makedirs(od, exist_ok=True)
            res["outputs"] = []
            for i, o in enumerate(outs):
                p = os.path.join(od, f"{i}.npy")
                np.save(p, o)
                res["outputs"].append(p)
            times = []
            for _ in range(int(req.get("repeats", 0))):
                t = time.perf_counter()
                eng.run(feeds)
                times.append(time.perf_counter() - t)
            res["run_seconds"] = times
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    req = json.loads(sys.stdin.read() or "{}")
    action = req.get("action")
    try:
        if action == "info":
            res = _info()
        elif action == "run":
            res = _run(req)
        else:
            res = {"error": f"unknown action {action!r}"}
    except Exception as e:  # report, do not crash without a result
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + TAG + " " + json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
