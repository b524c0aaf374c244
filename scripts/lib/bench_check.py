#!/usr/bin/env python3
"""The check faces beside `/auth/me` (issue 12 part 6), part of `make bench`; started by
scripts/bench-check.sh, which builds or finds the binaries.

One Gatehouse (embedded store, a `[check]` listener on loopback with a shared key) pinned to
core 0 with one Tokio worker; the load generators on core 1:

  A  `GET /auth/me` with the session cookie (wrk, keep-alive HTTP/1.1),
  B  `GET /check` on the check listener, as nginx's `auth_request` subrequest sends it (the
     browser's cookie and headers, `X-Original-URL`, `X-Original-Method`, the shared key; wrk),
  C  Envoy ext_authz v3 `Authorization/Check` over h2c (the ext_authz_load example: a realistic
     CheckRequest for `GET /api/notes` with the cookie, the key as gRPC metadata).

Measured alternately (A B C, ROUNDS times), median round by rate. The targets are judged per
server core: 1e6 / server CPU µs per request, read from /proc/<pid>/stat around each run — on a
2-core machine the load generator's own limit often sets the closed-loop rate, not the server.
The ratios: HTTP check ≥ 90 % and gRPC check ≥ 70 % of `/auth/me`'s rate per server core.

Helpers (processes, Keycloak admin, login, wrk) are bench_oauth2_proxy's. Nothing here talks to
anything but loopback addresses; every process it starts is ended by its own pid at exit.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_oauth2_proxy as b  # noqa: E402

LOAD = os.environ.get("EXT_AUTHZ_LOAD_BIN", "")
GRPC_CONNS = int(os.environ.get("BENCH_GRPC_CONNECTIONS", "4"))
OUT_JSON = os.environ.get("BENCH_JSON", str(b.WORK / "results.json"))
# Ports beside bench_oauth2_proxy's (18950-18963), outside the tests' 18000-18039.
b.P.update(ck=18964, ck_check=18965)
# The same browser headers on every face, so that none parses less than the others.
BROWSER = {"Accept": "application/json", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}
TARGETS = {"check_http": 0.90, "check_grpc": 0.70}


def log(*a):
    print("bench-check:", *a, file=sys.stderr, flush=True)


def grpc(url, cookie, key_file, pid, duration=None):
    """The ext_authz_load example on core 1; fails (raises) unless every answer was an allow."""
    argv = ["taskset", "-c", "1", LOAD, url, cookie, "--concurrency", str(b.CONNS), "--connections",
            str(GRPC_CONNS), "--key-file", str(key_file)]
    if duration is None and b.WARMUP:
        subprocess.run(argv + ["--duration", str(b.WARMUP)], capture_output=True, check=True)
    t0 = b.cpu_ticks(pid)
    p = subprocess.run(argv + ["--duration", str(duration or b.DURATION)], capture_output=True, text=True)
    t1 = b.cpu_ticks(pid)
    if p.returncode != 0:
        raise RuntimeError(f"ext_authz_load failed ({p.returncode}): {p.stderr.strip()[-400:]} {p.stdout.strip()[:400]}")
    r = json.loads(p.stdout)
    return {"rps": r["rps"], "p50": r["p50_ms"], "p99": r["p99_ms"], "requests": r["requests"],
            "cpu_us": (t1 - t0) / b.HZ / max(r["requests"], 1) * 1e6, "rss_kib": b.rss_kib(pid)}


def main():
    if not LOAD or not os.access(LOAD, os.X_OK):
        raise SystemExit(f"EXT_AUTHZ_LOAD_BIN={LOAD!r} is not an executable")
    b.WORK.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {1})  # logins and bookkeeping stay off the server's core
    admin = b.Admin()
    b.ADMIN.append(admin)
    admin.ensure_user()
    admin.ensure_client("bench-gatehouse", "bench-gatehouse-secret")
    gh = b.start_gh("gh-check", b.P["ck"], "bench-gatehouse", "bench-gatehouse-secret", "embedded",
                    check=True, check_port=b.P["ck_check"])
    cookie = b.gh_login(b.P["ck"])
    key_file = b.WORK / "check.key"
    me_url = f"http://127.0.0.1:{b.P['ck']}/auth/me"
    check_url = f"http://127.0.0.1:{b.P['ck_check']}/check"
    grpc_url = f"http://127.0.0.1:{b.P['ck_check']}"
    me_headers = {"Cookie": cookie, **BROWSER}
    check_headers = {"Cookie": cookie, **BROWSER, "X-Original-URL": "https://app.example.com/api/notes?limit=20",
                     "X-Original-Method": "GET", "X-Gatehouse-Check-Key": b.CHECK_KEY}
    # Sanity: each face allows this session before anything is measured.
    for url, h in ((me_url, me_headers), (check_url, check_headers)):
        st = b.requests.get(url, headers=h, timeout=30).status_code
        if st != 200:
            raise SystemExit(f"sanity: {url} answered {st}, expected 200")
    grpc(grpc_url, cookie, key_file, gh.pid, duration=0.5)
    # ...and the gRPC load generator refuses to measure a dead session.
    p = subprocess.run([LOAD, grpc_url, "__Host-Http-gatehouse=forged", "--duration", "0.2", "--key-file",
                        str(key_file)], capture_output=True, text=True)
    if p.returncode == 0:
        raise SystemExit("sanity: ext_authz_load accepted denials as a measurement")
    log("logged in; /auth/me, /check and gRPC Check allow the session; a forged cookie fails the gRPC run")

    faces = [("auth_me", lambda: b.wrk(me_url, me_headers, True, gh.pid)),
             ("check_http", lambda: b.wrk(check_url, check_headers, True, gh.pid)),
             ("check_grpc", lambda: grpc(grpc_url, cookie, key_file, gh.pid))]
    runs = {k: [] for k, _ in faces}
    for r in range(b.ROUNDS):
        for k, fn in faces:
            m = fn()
            runs[k].append(m)
            log(f"round {r + 1}: {k} {m['rps']:.0f} req/s, p99 {m['p99']:.2f} ms, {m['cpu_us']:.1f} µs CPU")
    res = {"meta": {"duration_s": b.DURATION, "rounds": b.ROUNDS, "connections": b.CONNS,
                    "grpc_connections": GRPC_CONNS}, "faces": {}}
    for k, _ in faces:
        med = dict(sorted(runs[k], key=lambda m: m["rps"])[len(runs[k]) // 2])
        med["rps_all"] = [round(m["rps"]) for m in runs[k]]
        med["cpu_us_all"] = [round(m["cpu_us"], 1) for m in runs[k]]
        med["cpu_us_median"] = statistics.median(m["cpu_us"] for m in runs[k])
        res["faces"][k] = med
    Path(OUT_JSON).write_text(json.dumps(res, indent=1))
    print(render(res))


def render(r):
    m, f = r["meta"], r["faces"]
    me = f["auth_me"]
    lines = [f"One Gatehouse on core 0 with one Tokio worker (embedded store), load on core 1; {m['connections']} "
             f"connections for wrk, {m['connections']} concurrent streams over {m['grpc_connections']} h2c connections "
             f"for gRPC; {m['duration_s']} s per run, {m['rounds']} alternating round(s), median. "
             "Targets judged on the rate per server core (1e6 / server CPU µs per request).", "",
             "| face | req/s (core busy %) | p50 / p99 ms | server CPU µs/req (runs) | req/s per server core | "
             "**per core vs `/auth/me`** | raw rate vs `/auth/me` | target | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"auth_me": "`GET /auth/me` (public listener, wrk)",
             "check_http": "`GET /check` as nginx `auth_request` sends it (check listener, wrk)",
             "check_grpc": "ext_authz v3 gRPC `Check` over h2c (check listener, ext_authz_load)"}
    for k, label in names.items():
        d = f[k]
        busy = d["rps"] * d["cpu_us_median"] / 1e4
        core = me["cpu_us_median"] / d["cpu_us_median"]
        raw = d["rps"] / me["rps"]
        target = TARGETS.get(k)
        lines.append(f"| {label} | {d['rps']:.0f} ({busy:.0f} %) | {d['p50']:.2f} / {d['p99']:.2f} | "
                     f"{d['cpu_us_median']:.1f} ({', '.join(str(x) for x in d['cpu_us_all'])}) | "
                     f"{1e6 / d['cpu_us_median']:.0f} | **{core * 100:.0f} %** | {raw * 100:.0f} % | "
                     f"{'—' if target is None else f'≥ {target * 100:.0f} %'} | "
                     f"{'—' if target is None else ('met' if core >= target else 'missed')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops what we started
    try:
        main()
    finally:
        b.stop_all()
        for a in b.ADMIN:
            try:
                a.logout_user()
            except Exception as e:  # noqa: BLE001 - best effort at exit
                log("could not log the bench user out at Keycloak:", e)
