"""The load test (benchmarks/feedback_load.py) at a reduced count: a real uvicorn server on loopback, concurrent
labelers, a SIGKILL + restart mid-run; every acknowledged judgement stored exactly once."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("feedback_load", ROOT / "benchmarks" / "feedback_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--separate-next"], ["--pin", "--think-ms", "5"]])
def test_load_with_kill_and_restart(tmp_path, extra):
    import os

    if "--pin" in extra and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--pin needs 2 cores")
    affinity = os.sched_getaffinity(0)
    out = tmp_path / "r.json"
    rc = _bench().main(["--labelers", "12", "--judgements", "400", "--kill-at", "0.4", "--json", str(out),
                        "--db", str(tmp_path / "load.db"), *extra])
    r = json.loads(out.read_text())
    assert rc == 0, r
    assert os.sched_getaffinity(0) == affinity  # --pin gave this process its cores back
    assert r["acked"] >= 400 and r["errors"] == []
    assert len(r["restarts"]) == 1 and r["restarts"][0]["acked_at_kill"] >= 160
    c = r["check"]
    assert c["ok"] and c["acked_missing"] == 0 and c["duplicate_keys"] == 0 and c["stored_rows"] == r["acked"]
    assert c["max_labelers_per_item"] <= c["k"] and c["duplicate_item_labeler"] == 0
    assert r["submit_p50_ms"] > 0 and r["judgements_per_s"] > 0
    assert r["sign_in_s"] > 0 and r["judgements_per_s_including_sign_in"] < r["judgements_per_s"]
    assert r["server_cpu_ms_per_judgement"] > 0 and r["client_loop_max_lag_ms"] >= 0
    assert (r["pinned"] is not None) == ("--pin" in extra)
    assert (r["offered_per_s"] is not None) == ("--think-ms" in extra)


def test_load_with_a_big_import_during_the_run(tmp_path):
    """An admin uploads 6,000 rows through the app's import route while 12 labelers label and the server is killed
    and restarted: no 500, no submission slower than 1 s, every acknowledged judgement stored once, and the import
    complete (re-sent after the kill if it was cut: exactly 6,000 prompts, none twice)."""
    out = tmp_path / "r.json"
    rc = _bench().main(["--labelers", "12", "--judgements", "1500", "--kill-at", "0.4", "--import-rows", "6000",
                        "--json", str(out), "--db", str(tmp_path / "load.db")])
    r = json.loads(out.read_text())
    assert rc == 0, r
    assert r["errors"] == [] and r["check"]["ok"] and r["check"]["stored_rows"] == r["acked"] >= 1500
    assert 500 not in r["http_5xx"] and r["submits_over_1s"] == 0, r
    imp = r["import"]
    assert imp["statuses"][-1] == 200 and imp["ok"], imp
    assert imp["prompts_stored"] == imp["items_stored"] == imp["distinct_keys"] == 6000
