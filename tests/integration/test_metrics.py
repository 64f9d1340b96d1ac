"""Prometheus metrics: both cairnds of a replicated volume serve /metrics
([cairnd] metrics_listen); the page parses as the text exposition format
and says what `cairn status` says; Debian's real prometheus server scrapes
both and answers the lag through its HTTP API. The alert rules pass
promtool's checks and their unit tests, and the Grafana dashboard asks
only for metrics cairnd exports."""
import json
import os
import random
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import cairn_testlib as lib

MiB = 1 << 20
DEPLOY = os.path.join(lib.ROOT, "deploy")


def _with_metrics(config_text, port):
    return config_text.replace("[cairnd]\n", f"[cairnd]\nmetrics_listen = 127.0.0.1:{port}\n", 1)


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def _samples(port):
    status, ctype, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    out = {}
    for family in text_string_to_metric_families(text):  # raises on a malformed page
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, text


def _value(samples, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def test_metrics_say_what_status_says_and_prometheus_scrapes_them(
        site_a, site_b, workdir, daemons, name):
    size = 16 * MiB
    site_a.create(name, size)
    rng = random.Random(30)
    import rbd
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(3 * MiB), 0)
    port, a_metrics, b_metrics = lib.free_port(), lib.free_port(), lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", _with_metrics(lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool"), b_metrics)))
    source = daemons(lib.Cairnd(workdir, "source-a", _with_metrics(lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")}), a_metrics)))
    seq = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(MiB), 8 * MiB)
    seq = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]

    for role, d, mport in (("source", source, a_metrics), ("sink", sink, b_metrics)):
        site = "a" if role == "source" else "b"
        st = [s for s in d.json("status", name) if s["role"] == role][0]
        samples, text = _samples(mport)
        labels = {"site": site, "volume": name, "role": role}
        assert _value(samples, "cairn_up", site=site) == 1
        assert _value(samples, "cairn_volume_last_point_seq", **labels) == seq == st["last_seq"]
        assert _value(samples, "cairn_volume_has_point", **labels) == 1
        assert _value(samples, "cairn_volume_up", **labels) == 1
        assert _value(samples, "cairn_volume_bytes_total", **labels) == st["bytes_total"] >= 4 * MiB
        assert _value(samples, "cairn_volume_epochs_total", **labels) == st["epochs_total"] == 2
        assert _value(samples, "cairn_volume_state", state="idle", **labels) == 1
        assert _value(samples, "cairn_volume_state", state="error", **labels) == 0
        assert 0 <= _value(samples, "cairn_volume_lag_seconds", **labels) < 600
        assert _value(samples, "cairn_volume_epoch_duration_seconds_count", **labels) == 2
        assert _value(samples, "cairn_volume_epoch_duration_seconds_bucket", le="+Inf",
                      **labels) == 2
        assert _value(samples, "cairn_volume_epoch_duration_seconds_sum", **labels) > 0
    try:
        _get(f"http://127.0.0.1:{b_metrics}/other")
        raise AssertionError("/other was answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404

    # Debian's prometheus scrapes both and answers the lag.
    prom_port = lib.free_port()
    prom_dir = os.path.join(workdir, "prometheus")
    os.makedirs(prom_dir)
    with open(os.path.join(prom_dir, "prometheus.yml"), "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: cairn\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{a_metrics}', '127.0.0.1:{b_metrics}']\n"
                f"rule_files:\n  - {DEPLOY}/prometheus/cairn-alerts.yml\n")
    log = open(os.path.join(prom_dir, "log"), "w")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={prom_dir}/prometheus.yml",
         f"--storage.tsdb.path={prom_dir}/data", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        query = f'cairn_volume_lag_seconds{{volume="{name}",role="sink"}}'

        def answered():
            try:
                _, _, body = _get(f"http://127.0.0.1:{prom_port}/api/v1/query?"
                                  + urllib.parse.urlencode({"query": query}))
            except OSError:
                return None
            r = json.loads(body)
            return r["data"]["result"] if r["status"] == "success" else None

        result = lib.wait_for("prometheus answering the lag of the volume at site B", answered,
                              timeout=60, interval=0.5)
        assert result[0]["metric"]["site"] == "b" and result[0]["metric"]["job"] == "cairn"
        assert 0 <= float(result[0]["value"][1]) < 600
        _, _, rules = _get(f"http://127.0.0.1:{prom_port}/api/v1/rules")
        loaded = {r["name"] for g in json.loads(rules)["data"]["groups"] for r in g["rules"]}
        assert "CairnReplicationLagHigh" in loaded and "CairnReplicationDown" in loaded
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        log.close()

    # The dashboard asks for metrics cairnd exports, and nothing else.
    _, text = _samples(b_metrics)
    exported = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    with open(os.path.join(DEPLOY, "grafana", "cairn-dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(cairn_[a-z_]+)", e)}
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert used and used <= exported, used - exported


def test_the_alert_rules_pass_promtool():
    d = os.path.join(DEPLOY, "prometheus")
    for args in (["check", "rules", "cairn-alerts.yml"], ["test", "rules", "cairn-alerts.test.yml"]):
        r = subprocess.run(["promtool", *args], cwd=d, capture_output=True, text=True)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
