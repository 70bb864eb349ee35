"""Run the `process` job over an archive on a Ray cluster.

usage: python -m sonoguide.cluster INPUT [INPUT ...] --out DIR [--address ADDR] [--workers N]
                                   [--preset NAME] [--backend auto|gpu|cpu] [--no-seg]
                                   [--skip-existing] [--recursive]
       python -m sonoguide.cluster dicomweb+http://HOST/ROOT --out DIR [--study UID]
                                   [--since YYYYMMDD] [--modality US] [--user NAME] [--store] ...

Inputs are DICOM files or folders, or one DICOMweb server (its instances are found by the
driver, and each worker retrieves, processes and with --store sends back its own; the password
or token is read from SONOGUIDE_DICOMWEB_PASSWORD / SONOGUIDE_DICOMWEB_TOKEN and handed to the
workers in their environment). Each file becomes one call on a pool of Ray actors; every
actor holds one warm pipeline (and asks for a GPU when the cluster has them). Outputs are
exactly those of `sonoguide process`: OUT/<stem>/… per file and OUT/summary.json with the same
entries, resume (--skip-existing) and per-file errors: a file that fails is reported and the
others go on. A worker that dies mid-file is restarted by Ray and the file retried, so each
input ends done exactly once (outputs are written under temporary names and renamed).

OUT must be a folder every node sees at the same path (shared storage on a real cluster), and
every node needs the sonoguide wheel installed in the Python that Ray runs.

Exit codes: 0 all good, 1 some inputs failed, 2 usage error, 3 the cluster cannot be reached.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

from . import _sonoguide

EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
# Ray restarts a dead actor and retries its call this many times before the file is reported
# as failed (a file that crashes its worker every time must not loop forever).
RETRIES = 3


def _merge(total, counts):
    for stage, by in counts.items():
        for backend, n in by.items():
            total.setdefault(stage, {}).setdefault(backend, 0)
            total[stage][backend] += n


def _overall(counts):
    used = {b for by in counts.values() for b, n in by.items() if n > 0}
    if not used:
        return None
    return used.pop() if len(used) == 1 else "mixed"


def _write_json(path, doc):
    fd, tmp = tempfile.mkstemp(prefix=".summary.json.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# How long the cluster's head may take to accept a connection before it counts as unreachable
# (Ray's own client retries for minutes).
CONNECT_TIMEOUT_S = 10.0


def _unreachable(address):
    """Why HOST:PORT does not accept a TCP connection, or None (also for `auto`, `local`,
    `ray://` and no address, which Ray resolves itself)."""
    if not address or address in ("auto", "local") or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return "expected HOST:PORT"
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return str(e)
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sonoguide.cluster", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="DICOM files or folders")
    p.add_argument("--out", required=True, help="output folder (shared by every node)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. 127.0.0.1:6379 or auto); none starts Ray here")
    p.add_argument("--workers", type=int, default=None,
                   help="actors (default: one per GPU when the cluster has GPUs, else per CPU)")
    p.add_argument("--preset", default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--no-seg", action="store_true", help="write no DICOM SEG")
    p.add_argument("--skip-existing", action="store_true", help="resume: skip complete inputs")
    p.add_argument("--recursive", action="store_true", help="look into sub-folders")
    p.add_argument("--study", default=None, help="DICOMweb: only this study")
    p.add_argument("--since", default=None, help="DICOMweb: only studies from this date on")
    p.add_argument("--modality", default="US", help="DICOMweb: only this modality")
    p.add_argument("--user", default=None, help="DICOMweb: Basic authentication user")
    p.add_argument("--store", action="store_true",
                   help="DICOMweb: send the overlay and SEG back into each study")
    return p.parse_args(argv)


def _uid_stem(uid):
    """The output folder of an instance: its SOP Instance UID as `sonoguide process` names it."""
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:64]


def _failed_entry(path, error):
    return {"path": str(path), "status": "failed", "output": None, "frames": 0, "plan": None,
            "timings": None, "error": error}


def run(args):
    try:
        import ray
    except ImportError:
        print("error: Ray is not installed (pip install 'ray[default]')", file=sys.stderr)
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    # Workers run in folders of their own: every path they see is absolute.
    args.out = os.path.abspath(args.out)
    args.url = None
    urls = [i for i in args.inputs if i.startswith("dicomweb+")]
    if urls and len(args.inputs) > 1:
        print("error: a DICOMweb address must be the only input", file=sys.stderr)
        return EXIT_USAGE
    if urls:
        args.url = urls[0]
    else:
        args.inputs = [os.path.abspath(i) for i in args.inputs]
    options = dict(preset=args.preset, backend=args.backend, seg=not args.no_seg)
    try:
        # Built here first: a bad preset or backend is a usage error before any cluster work.
        local = _sonoguide.Batch(**options)
    except _sonoguide.SonoguideError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create output folder {args.out}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.url:
        try:
            found = _sonoguide.dicomweb_search(args.url, args.study, args.since, args.modality,
                                               args.user)
        except _sonoguide.ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_SERVER
        except _sonoguide.SonoguideError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE if "not a DICOMweb address" in str(e) else EXIT_INPUT_FAILED
        # Work items: (what the summary calls the input, the instance's UIDs).
        files = [f"{args.url}/studies/{s}/series/{se}/instances/{i}" for s, se, i in found]
        stems = [_uid_stem(i) for _, _, i in found]
        args.instances = found
        missing = []
    else:
        files, stems, missing = _sonoguide.plan_inputs(args.inputs, args.out, args.recursive)
    reason = _unreachable(args.address)
    if reason:
        print(f"error: Ray cluster {args.address}: unreachable: {reason}", file=sys.stderr)
        return EXIT_SERVER
    # One Rayon thread per actor: the cluster spreads files, not pixels.
    env_vars = {"RAYON_NUM_THREADS": "1"}
    for key in ("SONOGUIDE_DICOMWEB_PASSWORD", "SONOGUIDE_DICOMWEB_TOKEN"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    env = {"env_vars": env_vars}
    try:
        ray.init(address=args.address, runtime_env=env, log_to_driver=False,
                 include_dashboard=False)
    except Exception as e:  # Ray raises several types for an unreachable cluster.
        print(f"error: Ray cluster {args.address or 'local'}: unreachable: {e}", file=sys.stderr)
        return EXIT_SERVER
    try:
        return _run_on_cluster(ray, args, options, local, files, stems, missing)
    finally:
        ray.shutdown()


def _run_on_cluster(ray, args, options, local, files, stems, missing):
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    wanted = args.workers or (gpus if gpus > 0 else cpus)
    n_workers = max(1, min(wanted, len(files) or 1))

    @ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
    class Worker:
        def __init__(self, opts):
            from sonoguide import _sonoguide as native

            self.batch = native.Batch(**opts)

        def run_file(self, path, out, stem, skip):
            return self.batch.run_file(path, out, stem, skip)

        def run_instance(self, url, user, uids, label, out, stem, skip, store):
            from sonoguide import _sonoguide as native

            study, series, instance = uids
            cache = os.path.join(out, ".dicomweb")
            try:
                path = native.dicomweb_retrieve(url, study, series, instance, cache, user)
            except native.SonoguideError as e:
                return json.dumps(_failed_entry(label, str(e))), "{}"
            entry_json, counts = self.batch.run_file(str(path), out, stem, skip)
            entry = json.loads(entry_json)
            if store and entry["status"] == "ok":
                try:
                    native.dicomweb_store(url, entry["output"], stem, study, user)
                except native.SonoguideError as e:
                    entry["status"] = "failed"
                    entry["error"] = f"storing the outputs of {stem}: {e}"
            return json.dumps(entry), counts

        def device(self):
            return self.batch.device

    gpu_each = 1 if gpus > 0 else 0
    workers = [Worker.options(num_cpus=1, num_gpus=gpu_each).remote(options)
               for _ in range(n_workers)]
    print(f"{len(files)} file(s) on {n_workers} worker(s)"
          f"{' with a GPU each' if gpu_each else ''}", file=sys.stderr)
    start = time.perf_counter()
    queue = list(range(len(files)))
    queue.reverse()
    in_flight = {}
    results = {}
    def submit(w, i):
        if args.url:
            ref = w.run_instance.remote(args.url, args.user, args.instances[i], files[i],
                                        args.out, stems[i], args.skip_existing, args.store)
        else:
            ref = w.run_file.remote(str(files[i]), args.out, stems[i], args.skip_existing)
        in_flight[ref] = (i, w)

    for w in workers:
        if queue:
            submit(w, queue.pop())
    done = 0
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        i, w = in_flight.pop(ref)
        try:
            entry_json, counts_json = ray.get(ref)
            entry, counts = json.loads(entry_json), json.loads(counts_json)
        except Exception as e:  # the worker died RETRIES times on this file, or Ray failed
            entry = _failed_entry(files[i], f"{files[i]}: lost on the cluster: "
                                            f"{type(e).__name__}: {e}")
            counts = {}
            # A dead actor is replaced so that the rest of the queue still runs.
            workers.remove(w)
            w = Worker.options(num_cpus=1, num_gpus=gpu_each).remote(options)
            workers.append(w)
        results[i] = (entry, counts)
        done += 1
        line = entry["error"] if entry.get("error") else f"{entry['path']}: {entry['status']}"
        print(f"[{done}/{len(files)}] {line}", file=sys.stderr)
        if queue:
            submit(w, queue.pop())
    elapsed = time.perf_counter() - start
    entries = [json.loads(m) for m in missing]
    backends = {}
    for i in range(len(files)):
        entry, counts = results[i]
        entries.append(entry)
        _merge(backends, counts)
    failed = sum(1 for e in entries if e["status"] == "failed")
    devices = set()
    for w in workers:
        try:
            devices.add(tuple(ray.get(w.device.remote())))
        except Exception:  # a worker lost at the very end: its device is unknown
            pass
    devices = sorted(devices)
    processed = sum(1 for e in entries if e["status"] == "ok")
    doc = {
        "sonoguide_version": _sonoguide.__version__,
        "backend": _overall(backends) or local.device[0],
        "backends": backends,
        "device": ", ".join(f"{b}: {d}" for b, d in devices),
        "config": json.loads(local.config_json()),
        "files": entries,
        "failed": failed,
        "note": "research tool, not a medical device: every suggested path must be checked by a trained person",
        "cluster": {
            "address": args.address or "local",
            "workers": n_workers,
            "gpus_per_worker": gpu_each,
            "seconds": round(elapsed, 3),
            "files_per_s": round(processed / elapsed, 3) if elapsed > 0 else None,
        },
    }
    summary = os.path.join(args.out, "summary.json")
    _write_json(summary, doc)
    skipped = sum(1 for e in entries if e["status"] == "skipped")
    print(f"{processed} processed, {skipped} skipped, {failed} failed in {elapsed:.1f} s "
          f"on {n_workers} worker(s); summary in {summary}", file=sys.stderr)
    if failed:
        print("failures:", file=sys.stderr)
        for e in entries:
            if e["status"] == "failed":
                print(f"  {e['error']}", file=sys.stderr)
        return EXIT_INPUT_FAILED
    return 0


def main(argv=None):
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
