"""The Ray cluster runner on a real local cluster: `ray start --head` on 127.0.0.1 (no CPUs,
so that work goes to the workers) and two worker nodes of one CPU each, started here and
stopped afterwards. Token authentication is off for this loopback cluster only
(RAY_AUTH_MODE=disabled in these processes' environment).

Checks: a broken file is reported while the others complete; killing one worker in the middle
of a run still ends with every input done exactly once; a second run resumes (skips all)."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "sample-data"
# Ray's own start-up on a 2-core machine takes seconds; a run of a few files well under a
# minute. These bound waits, not speed.
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env,
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # A short temporary folder: Ray's socket paths must fit in 107 bytes.
    tmp = tempfile.mkdtemp(prefix="sg-ray-", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                   "--disable-usage-stats", f"--temp-dir={tmp}", env=env)
    assert head.returncode == 0, head.stderr
    try:
        for _ in range(2):
            w = ray_cli("start", f"--address={address}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=0", env=env)
            assert w.returncode == 0, w.stderr
        yield address, env
    finally:
        ray_cli("stop", "--force", env=env)
        shutil.rmtree(tmp, ignore_errors=True)


def run_cluster(address, env, inputs, out, *extra, cwd=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sonoguide.cluster", *map(str, inputs), "--out", str(out),
         "--address", address, "--backend", "cpu", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def test_a_broken_file_is_reported_while_the_others_complete(cluster, tmp_path):
    address, env = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in SAMPLES.glob("*.dcm"):
        shutil.copy(f, inputs / f.name)
    broken = inputs / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    out = tmp_path / "out"
    # Relative paths, as a user types them: the workers run in folders of their own.
    p = run_cluster(address, env, ["in"], "out", "--workers", "2", cwd=tmp_path)
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 1, err
    s = summary_of(out)
    by_name = {pathlib.Path(e["path"]).name: e for e in s["files"]}
    assert set(by_name) == {f.name for f in inputs.iterdir()}
    assert by_name["broken.dcm"]["status"] == "failed"
    assert "broken.dcm" in by_name["broken.dcm"]["error"]
    for name, e in by_name.items():
        if name != "broken.dcm":
            assert e["status"] == "ok", e
            stem = pathlib.Path(name).stem
            assert (out / stem / f"{stem}.overlay.dcm").is_file()
            assert (out / stem / f"{stem}.seg.dcm").is_file()
    assert s["failed"] == 1 and s["cluster"]["workers"] == 2
    assert "broken.dcm" in err


def test_killing_a_worker_midway_still_does_every_input_once(cluster, tmp_path):
    address, env = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    # Eight cines of eight frames: long enough to kill a worker in the middle.
    for i in range(8):
        shutil.copy(SAMPLES / "cine_0005.dcm", inputs / f"cine_{i}.dcm")
    out = tmp_path / "out"
    p = run_cluster(address, env, [inputs], out, "--workers", "2")
    # Wait for a worker to be busy on a file, then kill that worker's process.
    deadline = time.time() + START_TIMEOUT_S
    victim = None
    while victim is None and time.time() < deadline and p.poll() is None:
        busy = subprocess.run(["pgrep", "-f", "ray::Worker.run_file"], capture_output=True,
                              text=True).stdout.split()
        if busy:
            victim = int(busy[0])
        else:
            time.sleep(0.05)
    assert victim is not None, "no worker was ever seen busy"
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, err
    s = summary_of(out)
    names = sorted(pathlib.Path(e["path"]).name for e in s["files"])
    assert names == sorted(f.name for f in inputs.iterdir())  # each once
    assert all(e["status"] == "ok" and e["frames"] == 8 for e in s["files"]), s["files"]
    for i in range(8):
        d = out / f"cine_{i}"
        assert (d / f"cine_{i}.overlay.dcm").is_file()
        assert not [n for n in os.listdir(d) if n.startswith(".")], os.listdir(d)
    # Resume: everything is complete, so a second run skips every input.
    p = run_cluster(address, env, [inputs], out, "--workers", "2", "--skip-existing")
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, err
    assert all(e["status"] == "skipped" for e in summary_of(out)["files"])


def test_an_unreachable_cluster_is_exit_3(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    p = subprocess.run(
        [sys.executable, "-m", "sonoguide.cluster", str(SAMPLES), "--out", str(tmp_path),
         "--address", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert p.returncode == 3, p.stderr
    assert "unreachable" in p.stderr


@pytest.fixture()
def orthanc(tmp_path):
    """A real Orthanc with its DICOMweb plugin on 127.0.0.1 (as in tests/dicomweb.rs)."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    if exe is None or not os.path.exists(plugin):
        if os.environ.get("CI"):
            pytest.fail("CI must have orthanc and orthanc-dicomweb (.ci/run installs them)")
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    port = free_port()
    config = {"Name": "sonoguide-test", "StorageDirectory": str(tmp_path / "db"),
              "IndexDirectory": str(tmp_path / "db"), "HttpPort": port,
              "DicomServerEnabled": False, "DicomPort": free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {"sono": "guide-test"}, "Plugins": [plugin],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([exe, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import base64
    import urllib.request

    auth = "Basic " + base64.b64encode(b"sono:guide-test").decode()

    def call(path, data=None):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Authorization": auth})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            call("/system")
            break
        except OSError:
            assert time.time() < deadline, "Orthanc did not start"
            time.sleep(0.2)
    try:
        yield port, call
    finally:
        proc.kill()
        proc.wait()


def test_dicomweb_studies_on_the_cluster_are_stored_back(cluster, orthanc, tmp_path):
    address, env = cluster
    port, call = orthanc
    for f in sorted(SAMPLES.glob("*.dcm")):
        assert call("/instances", f.read_bytes())["Status"] == "Success"
    env = dict(env, SONOGUIDE_DICOMWEB_PASSWORD="guide-test")
    out = tmp_path / "out"
    p = run_cluster(address, env, [f"dicomweb+http://127.0.0.1:{port}/dicom-web"], out,
                    "--workers", "2", "--user", "sono", "--store")
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, err
    s = summary_of(out)
    n = len(list(SAMPLES.glob("*.dcm")))
    assert len(s["files"]) == n and all(e["status"] == "ok" for e in s["files"]), s["files"]
    series = call("/series?expand")
    seg = [x for x in series if x["MainDicomTags"].get("Modality") == "SEG"]
    assert len(seg) == n, [x["MainDicomTags"] for x in series]
    # Wrong password: exit 3 before any work.
    bad = dict(env, SONOGUIDE_DICOMWEB_PASSWORD="wrong")
    p = run_cluster(address, bad, [f"dicomweb+http://127.0.0.1:{port}/dicom-web"], out,
                    "--user", "sono")
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 3, err
    assert "authentication refused" in err
