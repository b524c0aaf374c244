#!/usr/bin/env python3
"""Gatehouse beside oauth2-proxy: the side-by-side benchmark of `make bench` (issue 14 part 1,
issue 12 part 6). Started by scripts/bench-oauth2-proxy.sh, which builds or finds the binaries.

Both products run against the same Keycloak realm, the same redis-server and the same upstream
(an nginx server block that answers 200 only when a token was relayed). Each server is pinned to
core 0 with one worker (Gatehouse: TOKIO_WORKER_THREADS=1; oauth2-proxy: GOMAXPROCS=1); the load
generators (wrk, vegeta) and nginx run on core 1. Every pair is measured alternately (A B A B ...,
ROUNDS times) and the median round is reported.

Nothing here talks to anything but loopback addresses. Every process this script starts is ended
by its own pid at exit.
"""

import asyncio
import base64
import concurrent.futures
import html
import json
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import requests

E = os.environ
GH = E.get("GATEHOUSE_BIN", "")
O2P = E.get("OAUTH2_PROXY_BIN", "")
VEGETA = E.get("VEGETA_BIN", "")
WORK = Path(E.get("BENCH_WORK", "."))
KC = E.get("KEYCLOAK_URL", "http://localhost:18180").rstrip("/")
REALM = "gatehouse"
ISSUER = f"{KC}/realms/{REALM}"
DURATION = int(str(E.get("BENCH_DURATION", "10")).rstrip("s"))
WARMUP = int(str(E.get("BENCH_WARMUP", "1")).rstrip("s"))
ROUNDS = int(E.get("ROUNDS", "3"))
CONNS = int(E.get("BENCH_CONNECTIONS", "32"))
FIXED_RATE = int(E.get("BENCH_FIXED_RATE", "2000"))
N_CONNS = int(E.get("FOOTPRINT_CONNECTIONS", "10000"))
N_SESSIONS = int(E.get("FOOTPRINT_SESSIONS", "1000"))
# Live sessions minted through Gatehouse's own code (examples/mint_sessions.rs) for the measured,
# not extrapolated, footprint with that many sessions (embedded file and Redis).
N_LIVE = int(E.get("FOOTPRINT_LIVE_SESSIONS", "100000"))
MINT = E.get("MINT_BIN", "")
STORM = int(E.get("STORM_REQUESTS", "100"))
STORM_DELAY_MS = int(E.get("STORM_DELAY_MS", "300"))
OUT_JSON = E.get("BENCH_JSON", str(WORK / "results.json"))

USER, PASSWORD = "bench-user", "bench-user-password"
# Ports outside the 18000-18039 range the tests and the other bench scripts use.
P = dict(gh=18950, gh_check=18951, gh_redis=18952, o2p=18953, o2p_redis=18954,
         gh_storm=18955, gh_storm_redis=18956, o2p_storm=18957, o2p_storm_redis=18959,
         kc_delay=18958, redis=18960, upstream=18961, ng_gh=18962, ng_o2p=18963, gh_live=18964)
CHECK_KEY = secrets.token_urlsafe(36)
HZ = os.sysconf("SC_CLK_TCK")

procs = []  # (name, Popen)
ADMIN = []  # the Admin client, for the bench user's logout at exit


def log(*a):
    print("bench-oauth2-proxy:", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes

def start(name, argv, env=None, core=0, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    out = open(WORK / f"{name}.log", "w")
    p = subprocess.Popen(["taskset", "-c", str(core)] + argv, env=e, stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, cwd=cwd)
    procs.append((name, p))
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all():
    for _, p in reversed(procs):
        stop(p)


def wait_http(url, ok=(200, 202, 401), timeout=60, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process for {url} exited; see its log in {WORK}")
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout}s")


def cpu_ticks(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_parts_kib(pid):
    """RSS split into anonymous memory (heap, stacks: what the process allocated) and file-backed
    pages (its own code and the shared libraries, clean and reclaimable)."""
    v = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, rest = line.partition(":")
        v[k] = int(rest.split()[0])
    return {"rss": v["Rss"], "anon": v["Anonymous"], "file": v["Rss"] - v["Anonymous"],
            "anon_huge": v.get("AnonHugePages", 0)}


# ------------------------------------------------------------------ Keycloak admin (idempotent)

class Admin:
    """The test Keycloak's admin API (the bootstrap admin scripts/keycloak.sh creates)."""

    def __init__(self):
        self.base = f"{KC}/admin/realms/{REALM}"
        self._at = 0.0
        self._h = {}

    @property
    def h(self):
        # The master realm's admin tokens live 60 s; the run takes minutes.
        if time.time() - self._at > 30:
            r = requests.post(f"{KC}/realms/master/protocol/openid-connect/token",
                              data=dict(grant_type="password", client_id="admin-cli", username="admin",
                                        password="admin"))
            r.raise_for_status()
            self._h = {"Authorization": "Bearer " + r.json()["access_token"]}
            self._at = time.time()
        return self._h

    def get(self, path, **params):
        r = requests.get(self.base + path, headers=self.h, params=params)
        r.raise_for_status()
        return r.json()

    def ensure_client(self, client_id, secret, token_lifespan=None):
        ports = sorted(set(P.values()))
        body = {
            "clientId": client_id, "enabled": True, "publicClient": False, "secret": secret,
            "protocol": "openid-connect", "standardFlowEnabled": True, "directAccessGrantsEnabled": True,
            "redirectUris": [f"http://localhost:{p}/*" for p in ports],
            "webOrigins": [], "attributes": {"pkce.code.challenge.method": ""},
        }
        if token_lifespan:
            body["attributes"]["access.token.lifespan"] = str(token_lifespan)
        found = self.get("/clients", clientId=client_id)
        if found:
            cur = found[0]
            cur.update({k: v for k, v in body.items() if k != "attributes"})
            cur.setdefault("attributes", {}).update(body["attributes"])
            requests.put(f"{self.base}/clients/{cur['id']}", headers=self.h, json=cur).raise_for_status()
        else:
            requests.post(f"{self.base}/clients", headers=self.h, json=body).raise_for_status()

    def ensure_user(self):
        found = self.get("/users", username=USER, exact="true")
        body = {"username": USER, "enabled": True, "email": "bench-user@example.com", "emailVerified": True,
                "firstName": "Bench", "lastName": "User", "requiredActions": []}
        if found:
            uid = found[0]["id"]
            requests.put(f"{self.base}/users/{uid}", headers=self.h, json=body).raise_for_status()
        else:
            requests.post(f"{self.base}/users", headers=self.h, json=body).raise_for_status()
            uid = self.get("/users", username=USER, exact="true")[0]["id"]
        requests.put(f"{self.base}/users/{uid}/reset-password", headers=self.h,
                     json={"type": "password", "value": PASSWORD, "temporary": False}).raise_for_status()
        self.uid = uid

    def logout_user(self):
        requests.post(f"{self.base}/users/{self.uid}/logout", headers=self.h)

    def events(self, client_id, since_ms, etype):
        ev = self.get("/events", client=client_id, type=etype, max=10000)
        return sum(1 for e in ev if e.get("time", 0) >= since_ms)


# ------------------------------------------------------------------ logins

def gh_login(port, client=None):
    """Gatehouse's password login (the same request scripts/bench.sh makes); returns the Cookie value."""
    r = requests.post(f"http://localhost:{port}/auth/login", json={"username": USER, "password": PASSWORD},
                      headers={"X-CSRF": "1", "Origin": f"http://localhost:{port}"}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"Gatehouse login on {port}: {r.status_code} {r.text[:200]}")
    m = re.search(r"(__Host-Http-gatehouse=[^;]+)", r.headers.get("set-cookie", ""))
    if not m:
        raise RuntimeError("Gatehouse login: no session cookie")
    return m.group(1)


def o2p_login(port):
    """A real authorization-code login through oauth2-proxy: /oauth2/start -> Keycloak's login form ->
    POST the credentials -> /oauth2/callback. Returns the Cookie header with oauth2-proxy's cookies."""
    s = requests.Session()
    base = f"http://localhost:{port}"
    r = s.get(f"{base}/oauth2/start?rd=%2F", allow_redirects=True, timeout=60)
    m = re.search(r'<form[^>]*id="kc-form-login"[^>]*action="([^"]+)"', r.text) or \
        re.search(r'action="([^"]*login-actions/authenticate[^"]*)"', r.text)
    if not m:
        raise RuntimeError(f"oauth2-proxy login: no Keycloak login form at {r.url} ({r.status_code})")
    action = html.unescape(m.group(1))
    # Keycloak marks its login cookies Secure; browsers send those to http://localhost (a secure
    # context), Python's cookie jar would not.
    for c in s.cookies:
        c.secure = False
    r = s.post(action, data={"username": USER, "password": PASSWORD, "credentialId": ""},
               allow_redirects=False, timeout=60)
    # Follow Keycloak's redirect to the callback, but not oauth2-proxy's redirect onwards to the
    # upstream (that request is not part of a login).
    while r.status_code in (302, 303) and "/oauth2/callback" not in urllib.parse.urlparse(r.url).path:
        r = s.get(urllib.parse.urljoin(r.url, r.headers["location"]), allow_redirects=False, timeout=60)
    if r.status_code not in (302, 303):
        raise RuntimeError(f"oauth2-proxy login: {r.status_code} at {r.url}: {r.text[:200]}")
    cookies = [f"{c.name}={c.value}" for c in s.cookies if c.name.startswith("_oauth2_proxy") and c.name != "_oauth2_proxy_csrf"
               and not c.name.endswith("_csrf")]
    if not cookies:
        raise RuntimeError("oauth2-proxy login: no session cookie")
    cookie = "; ".join(cookies)
    st = requests.get(f"{base}/oauth2/auth", headers={"Cookie": cookie}, timeout=30).status_code
    if st != 202:
        raise RuntimeError(f"oauth2-proxy: /oauth2/auth after login answered {st}")
    return cookie


def many_logins(fn, n, parallel=8):
    ok = 0
    with concurrent.futures.ThreadPoolExecutor(parallel) as ex:
        for f in concurrent.futures.as_completed([ex.submit(fn) for _ in range(n)]):
            try:
                f.result()
                ok += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                log("login failed:", e)
    return ok


# ------------------------------------------------------------------ load

def _ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url, headers, expect_2xx, pid):
    hargs = sum((["-H", f"{k}: {v}"] for k, v in headers.items()), [])
    base = ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNS}"]
    if WARMUP:
        subprocess.run(base + [f"-d{WARMUP}s"] + hargs + [url], capture_output=True, check=True)
    t0 = cpu_ticks(pid)
    out = subprocess.run(base + [f"-d{DURATION}s", "--latency"] + hargs + [url], capture_output=True, text=True,
                         check=True).stdout
    t1 = cpu_ticks(pid)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errs = re.search(r"Socket errors: (.*)", out)
    if expect_2xx and non2xx:
        raise RuntimeError(f"{url}: {non2xx} of {total} answers were not 2xx")
    if not expect_2xx and non2xx != total:
        raise RuntimeError(f"{url}: expected only 4xx, got {total - non2xx} 2xx of {total}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))

    def pct(k):
        m = re.match(r"([\d.]+)(\w+)", lat[k])
        return _ms(m.group(1), m.group(2))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "cpu_us": (t1 - t0) / HZ / max(total, 1) * 1e6,
            "requests": total, "socket_errors": errs.group(1) if errs else "", "rss_kib": rss_kib(pid)}


def vegeta(url, headers):
    """Fixed-rate (open-loop) p99 at FIXED_RATE req/s with vegeta on core 1."""
    if not VEGETA:
        return {}
    target = f"GET {url}\n" + "".join(f"{k}: {v}\n" for k, v in headers.items())
    att = subprocess.run(["taskset", "-c", "1", VEGETA, "attack", f"-rate={FIXED_RATE}/s", f"-duration={DURATION}s",
                          "-max-workers=512"], input=target.encode(), capture_output=True, check=True).stdout
    rep = json.loads(subprocess.run([VEGETA, "report", "-type=json"], input=att, capture_output=True,
                                    check=True).stdout)
    return {"f_rate": rep["throughput"], "f_p50": rep["latencies"]["50th"] / 1e6,
            "f_p99": rep["latencies"]["99th"] / 1e6, "f_codes": rep.get("status_codes", {})}


def pair(name, a, b):
    """a, b: (label, url, headers, expect_2xx, pid). Alternates A B per round; returns medians."""
    res = {a[0]: [], b[0]: []}
    for r in range(ROUNDS):
        for side in (a, b):
            label, url, headers, exp, pid = side
            m = wrk(url, headers, exp, pid)
            res[label].append(m)
            log(f"{name} round {r + 1}: {label} {m['rps']:.0f} req/s, p99 {m['p99']:.2f} ms, {m['cpu_us']:.1f} µs CPU")
    out = {}
    for side in (a, b):
        label, url, headers, exp, pid = side
        runs = res[label]
        med = sorted(runs, key=lambda m: m["rps"])[len(runs) // 2]
        med = dict(med)
        med["rps_all"] = [round(m["rps"]) for m in runs]
        med["cpu_us_median"] = statistics.median(m["cpu_us"] for m in runs)
        med.update(vegeta(url, headers))
        out[label] = med
    return out


# ------------------------------------------------------------------ helpers in asyncio

async def _delay_proxy(listen, target, delay, stats, stop_ev):
    async def pipe(r, w, d):
        try:
            while data := await r.read(65536):
                if d:
                    stats["chunks"] += 1
                    await asyncio.sleep(d)
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def handle(cr, cw):
        stats["connections"] += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, delay), pipe(ur, cw, 0))

    asyncio.get_running_loop().set_exception_handler(lambda *_: None)  # connections cut at the end
    srv = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with srv:
        while not stop_ev.is_set():
            await asyncio.sleep(0.1)


def delay_proxy(listen, target, delay_ms):
    """A TCP proxy that holds every chunk the client sends for delay_ms: a slow IdP."""
    stats = {"connections": 0, "chunks": 0}
    stop_ev = threading.Event()
    t = threading.Thread(target=lambda: asyncio.run(_delay_proxy(listen, target, delay_ms / 1000, stats, stop_ev)),
                         daemon=True)
    t.start()
    return stats, stop_ev


async def _hold(port, n, path, measure):
    conns = []
    sem = asyncio.Semaphore(2000)
    req = f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(req)
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            if m:
                await r.readexactly(int(m.group(1)))
            conns.append((r, w))

    t0 = time.time()
    results = await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
    failed = sum(1 for x in results if isinstance(x, Exception))
    opened = time.time() - t0
    await asyncio.sleep(0.5)
    value = measure()
    for _, w in conns:
        w.close()
    return {"open": len(conns), "failed": failed, "seconds_to_open": round(opened, 1), **value}


def established(port):
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def hold_connections(port, n, path, pid):
    """Open n keep-alive connections (one answered request each), then read the server's RSS."""
    before = rss_kib(pid)
    # Gatehouse closes a keep-alive connection that sends nothing for 10 s: read the RSS as soon as
    # all are open, and count the connections the server side still holds at that moment.
    r = asyncio.run(_hold(port, n, path, lambda: {"rss_kib": rss_kib(pid), "established": established(port)}))
    r["rss_before_kib"] = before
    r["kib_per_conn"] = (r["rss_kib"] - before) / max(min(r["open"], r["established"]), 1)
    return r


def storm(url, cookie, n):
    """n concurrent requests released together on one session; returns the status counts."""
    barrier = threading.Barrier(n)

    def one():
        s = requests.Session()
        barrier.wait()
        try:
            return s.get(url, headers={"Cookie": cookie}, timeout=60).status_code
        except requests.RequestException:
            return 0
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        codes = list(ex.map(lambda _: one(), range(n)))
    counts = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    return counts


def redis_used():
    out = subprocess.run(["redis-cli", "-p", str(P["redis"]), "INFO", "memory"], capture_output=True, text=True).stdout
    return int(re.search(r"used_memory:(\d+)", out).group(1))


def redis_keys():
    return int(subprocess.run(["redis-cli", "-p", str(P["redis"]), "DBSIZE"], capture_output=True,
                              text=True).stdout.strip() or 0)


def mint(config, n, ids_out):
    """N live sessions in the store `config` names, through Gatehouse's code (mint_sessions)."""
    out = subprocess.run(["taskset", "-c", "1", MINT, str(config), str(n), USER, "-", str(ids_out)],
                         env={**os.environ, "MINT_PASSWORD": PASSWORD}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mint_sessions failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_sample(port, ids_file, k=500):
    """k of the minted sessions, spread over the whole set, through the server's /auth/me: all
    must answer 200 (they are live sessions, not just bytes in a store)."""
    ids = ids_file.read_text().split()
    step = max(len(ids) // k, 1)
    s = requests.Session()
    codes = {}
    for sid in ids[::step][:k]:
        c = s.get(f"http://127.0.0.1:{port}/auth/me", headers={"Cookie": f"__Host-Http-gatehouse={sid}"},
                  timeout=30).status_code
        codes[c] = codes.get(c, 0) + 1
    if set(codes) != {200}:
        raise SystemExit(f"minted sessions through /auth/me on {port}: {codes}")
    return sum(codes.values())


def live_sessions_embedded():
    """A Gatehouse of its own on a file with N_LIVE sessions: minted while it is stopped (the file
    is locked by the server), then RSS after start (which runs the integrity check over the whole
    file), after a sample of /auth/me, and the file's size."""
    port = P["gh_live"]
    cfg = gh_config("gh-live", port, "bench-gatehouse-mint", "bench-gatehouse-mint-secret", "embedded")
    ids = WORK / "gh-live.ids"
    m = mint(cfg, N_LIVE, ids)
    size = (WORK / "gh-live.redb").stat().st_size
    t0 = time.time()
    p = start("gh-live", [GH, "serve", "--config", str(cfg)], env={"TOKIO_WORKER_THREADS": "1"})
    wait_http(f"http://127.0.0.1:{port}/readyz", ok=(200,), timeout=300, proc=p)
    started = time.time() - t0
    time.sleep(1)
    r = {"minted": m, "file_bytes": size, "file_per_session_b": size / N_LIVE,
         "start_seconds": round(started, 1), "rss_after_start": rss_parts_kib(p.pid)}
    r["checked"] = check_sample(port, ids)
    r["rss_after_sample"] = rss_parts_kib(p.pid)
    stop(p)
    ids.unlink()
    return r


def live_sessions_redis(ghr):
    """N_LIVE sessions minted into the Redis the running Gatehouse uses: used_memory and keys per
    session, and that Gatehouse's RSS before and after a sample of /auth/me."""
    ids = WORK / "gh-redis-live.ids"
    u0, k0, r0 = redis_used(), redis_keys(), rss_parts_kib(ghr.pid)
    # Same Redis and session key as the running Gatehouse; the mint client's longer tokens.
    cfg = gh_config("gh-redis-mint", P["gh_redis"], "bench-gatehouse-mint", "bench-gatehouse-mint-secret", "redis")
    m = mint(cfg, N_LIVE, ids)
    r = {"minted": m, "redis_per_session_b": (redis_used() - u0) / N_LIVE,
         "keys_per_session": (redis_keys() - k0) / N_LIVE, "rss_before": r0}
    r["checked"] = check_sample(P["gh_redis"], ids)
    r["rss_after_sample"] = rss_parts_kib(ghr.pid)
    ids.unlink()
    return r


# ------------------------------------------------------------------ configuration

def gh_config(name, port, client, secret, store, check=False, extra_oidc="", check_port=None):
    key = WORK / "gh.key"
    if not key.exists():
        key.write_text(base64.b64encode(os.urandom(32)).decode())
        key.chmod(0o600)
    (WORK / "check.key").write_text(CHECK_KEY)
    store_toml = (f'store = "redis"\nredis_url = "redis://127.0.0.1:{P["redis"]}"' if store == "redis"
                  else f'path = "{WORK}/{name}.redb"')
    cfg = f"""[public]
listen = "127.0.0.1:{port}"
external_url = "http://localhost:{port}"
[oidc]
issuer = "{ISSUER}"
client_id = "{client}"
client_secret = "{secret}"
password_login = true
password_login_per_ip_per_minute = 1000000
password_login_per_user_per_minute = 1000000
{extra_oidc}
[session]
{store_toml}
encryption_key_file = "{key}"
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
[[routes]]
prefix = "/api/up/"
upstream = "http://127.0.0.1:{P['upstream']}/"
relay = "bearer"
"""
    if check:
        cfg += f'[check]\nlisten = "127.0.0.1:{check_port or P["gh_check"]}"\nkey_file = "{WORK}/check.key"\n'
    path = WORK / f"{name}.toml"
    path.write_text(cfg)
    return path


def start_gh(name, port, client, secret, store, check=False, extra_oidc="", env=None, check_port=None):
    cfg = gh_config(name, port, client, secret, store, check, extra_oidc, check_port)
    p = start(name, [GH, "serve", "--config", str(cfg)], env={"TOKIO_WORKER_THREADS": "1", **(env or {})})
    wait_http(f"http://127.0.0.1:{port}/readyz", ok=(200,), proc=p)
    return p


COOKIE_SECRET = base64.urlsafe_b64encode(os.urandom(32)).decode()


def start_o2p(name, port, client, secret, store, refresh="4m", token_url=None):
    argv = [O2P, f"--http-address=127.0.0.1:{port}", "--provider=keycloak-oidc", f"--client-id={client}",
            f"--client-secret={secret}", f"--redirect-url=http://localhost:{port}/oauth2/callback",
            f"--oidc-issuer-url={ISSUER}", f"--cookie-secret={COOKIE_SECRET}", "--cookie-secure=false",
            f"--cookie-refresh={refresh}", "--email-domain=*", f"--upstream=http://127.0.0.1:{P['upstream']}/",
            "--pass-access-token", "--set-authorization-header", "--set-xauthrequest", "--skip-provider-button",
            "--reverse-proxy", "--insecure-oidc-allow-unverified-email",
            "--request-logging=false", "--auth-logging=false", "--standard-logging=false"]
    if store == "redis":
        argv += ["--session-store-type=redis", f"--redis-connection-url=redis://127.0.0.1:{P['redis']}"]
    if token_url:
        # Discovery would name Keycloak's own address; point the back channel at the slow proxy.
        argv += ["--skip-oidc-discovery", f"--login-url={ISSUER}/protocol/openid-connect/auth",
                 f"--redeem-url={token_url}/realms/{REALM}/protocol/openid-connect/token",
                 f"--oidc-jwks-url={token_url}/realms/{REALM}/protocol/openid-connect/certs",
                 f"--profile-url={token_url}/realms/{REALM}/protocol/openid-connect/userinfo",
                 f"--validate-url={token_url}/realms/{REALM}/protocol/openid-connect/userinfo"]
    p = start(name, argv, env={"GOMAXPROCS": "1"})
    wait_http(f"http://127.0.0.1:{port}/ping", ok=(200,), proc=p)
    return p


UPSTREAM_BODY = ('{"sub":"0b6f2f46-8d2e-4f8e-9d7a-3c9a1a2b3c4d","email":"alice@example.com",'
                 '"preferred_username":"alice","name":"Alice Liddell"}')


def start_nginx():
    d = WORK / "nginx"
    d.mkdir(exist_ok=True)
    conf = f"""worker_processes 1;
worker_rlimit_nofile 4096;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 2048; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  large_client_header_buffers 4 32k;
  proxy_buffer_size 32k;
  proxy_buffers 8 32k;
  # The upstream: 200 only when a token was relayed (Authorization from Gatehouse or nginx,
  # X-Forwarded-Access-Token from oauth2-proxy).
  map "$http_authorization$http_x_forwarded_access_token" $no_token {{ "" 1; default 0; }}
  server {{
    listen 127.0.0.1:{P['upstream']};
    location / {{
      if ($no_token) {{ return 401; }}
      default_type application/json;
      return 200 '{UPSTREAM_BODY}';
    }}
  }}
  upstream gh_check {{ server 127.0.0.1:{P['gh_check']}; keepalive 32; }}
  upstream o2p {{ server 127.0.0.1:{P['o2p']}; keepalive 32; }}
  upstream echo {{ server 127.0.0.1:{P['upstream']}; keepalive 32; }}
  # nginx + Gatehouse's check listener (docs/gateways.md).
  server {{
    listen 127.0.0.1:{P['ng_gh']};
    location /app/ {{
      auth_request /_gatehouse;
      auth_request_set $gh_auth $upstream_http_authorization;
      proxy_set_header Authorization $gh_auth;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://echo;
    }}
    location = /_gatehouse {{
      internal;
      proxy_pass http://gh_check/check;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Gatehouse-Check-Key "{CHECK_KEY}";
    }}
  }}
  # nginx + oauth2-proxy's /oauth2/auth (its documented auth_request setup).
  server {{
    listen 127.0.0.1:{P['ng_o2p']};
    location /app/ {{
      auth_request /oauth2/auth;
      auth_request_set $o2p_token $upstream_http_x_auth_request_access_token;
      proxy_set_header Authorization "Bearer $o2p_token";
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://echo;
    }}
    location = /oauth2/auth {{
      internal;
      proxy_pass http://o2p;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
    }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    p = start("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"], core=1)
    wait_http(f"http://127.0.0.1:{P['upstream']}/", ok=(401,), proc=p)
    return p


# ------------------------------------------------------------------ main

def main():
    WORK.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(N_CONNS + 4096, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    os.sched_setaffinity(0, {1})  # this process (logins, connection holder, storm) stays off the servers' core
    results = {"meta": {"duration_s": DURATION, "rounds": ROUNDS, "connections": CONNS, "fixed_rate": FIXED_RATE,
                        "sessions_measured": N_SESSIONS, "idle_connections": N_CONNS, "storm_requests": STORM,
                        "storm_delay_ms": STORM_DELAY_MS}}

    admin = Admin()
    ADMIN.append(admin)
    admin.ensure_user()
    # bench-gatehouse-mint: the minted sessions share one real token set (one login), so they are
    # checked while its access token is valid — a refresh would rotate the one refresh token and
    # end the others. 20 minutes covers minting 100,000 and the check.
    for cid, life in (("bench-gatehouse", None), ("bench-gatehouse-short", 10), ("bench-gatehouse-mint", 1200),
                      ("bench-oauth2-proxy", None), ("bench-oauth2-proxy-short", 10)):
        admin.ensure_client(cid, f"{cid}-secret", life)
    log("Keycloak: user", USER, "and the bench-* clients are in place")

    rd = WORK / "redis"
    rd.mkdir(exist_ok=True)
    start("redis", ["redis-server", "--port", str(P["redis"]), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(rd)])
    for _ in range(50):
        if subprocess.run(["redis-cli", "-p", str(P["redis"]), "PING"], capture_output=True, text=True).stdout.strip() == "PONG":
            break
        time.sleep(0.1)
    start_nginx()

    gh = start_gh("gh", P["gh"], "bench-gatehouse", "bench-gatehouse-secret", "embedded", check=True)
    ghr = start_gh("gh-redis", P["gh_redis"], "bench-gatehouse", "bench-gatehouse-secret", "redis")
    o2p = start_o2p("o2p", P["o2p"], "bench-oauth2-proxy", "bench-oauth2-proxy-secret", "cookie")
    o2pr = start_o2p("o2p-redis", P["o2p_redis"], "bench-oauth2-proxy", "bench-oauth2-proxy-secret", "redis")
    time.sleep(1)
    results["rss_idle_kib"] = {"gatehouse": rss_kib(gh.pid), "gatehouse_redis": rss_kib(ghr.pid),
                               "oauth2_proxy": rss_kib(o2p.pid), "oauth2_proxy_redis": rss_kib(o2pr.pid)}
    results["rss_idle_parts_kib"] = {"gatehouse": rss_parts_kib(gh.pid), "oauth2_proxy": rss_parts_kib(o2p.pid)}

    ghc, ghrc = gh_login(P["gh"]), gh_login(P["gh_redis"])
    oc, orc = o2p_login(P["o2p"]), o2p_login(P["o2p_redis"])
    results["o2p_cookie_bytes"] = len(oc)
    log(f"logged in: Gatehouse (embedded, Redis), oauth2-proxy (cookie store {len(oc)} bytes of cookies, Redis)")

    forged_gh = "__Host-Http-gatehouse=" + secrets.token_urlsafe(32)
    forged_o2p = "_oauth2_proxy=" + secrets.token_urlsafe(len(oc) * 3 // 4 // 1)[: len(oc)]
    gh_url = f"http://127.0.0.1:{P['gh']}"
    o2p_url = f"http://127.0.0.1:{P['o2p']}"
    check_headers = {"Cookie": ghc, "X-Original-URL": f"http://localhost:{P['ng_gh']}/app/x",
                     "X-Original-Method": "GET", "X-Gatehouse-Check-Key": CHECK_KEY}
    # Sanity: each path answers what the run will assert.
    for url, h, want in ((f"{gh_url}/api/up/x", {"Cookie": ghc}, 200), (f"{o2p_url}/x", {"Cookie": oc}, 200),
                         (f"http://127.0.0.1:{P['ng_gh']}/app/x", {"Cookie": ghc}, 200),
                         (f"http://127.0.0.1:{P['ng_o2p']}/app/x", {"Cookie": oc}, 200),
                         (f"http://127.0.0.1:{P['gh_check']}/check", check_headers, 200)):
        st = requests.get(url, headers=h, timeout=30).status_code
        if st != want:
            raise SystemExit(f"sanity: {url} answered {st}, expected {want}")

    # oauth2-proxy's cookie-store session is a snapshot in the cookie: once it is older than
    # --cookie-refresh every request with that cookie refreshes again (and Keycloak's refresh-token
    # rotation then kills it). A fresh login before each pair keeps every run on a valid session.
    def o2p_fresh():
        return o2p_login(P["o2p"])

    cases = results["cases"] = {}
    oc = o2p_fresh()
    cases["session"] = pair("valid session check",
                            ("gatehouse", f"{gh_url}/auth/me", {"Cookie": ghc}, True, gh.pid),
                            ("oauth2_proxy", f"{o2p_url}/oauth2/auth", {"Cookie": oc}, True, o2p.pid))
    results["rss_after_load_kib"] = {"gatehouse": rss_kib(gh.pid), "oauth2_proxy": rss_kib(o2p.pid)}
    orc = o2p_login(P["o2p_redis"])
    cases["session_redis"] = pair("valid session check, Redis",
                                  ("gatehouse", f"http://127.0.0.1:{P['gh_redis']}/auth/me", {"Cookie": ghrc}, True, ghr.pid),
                                  ("oauth2_proxy", f"http://127.0.0.1:{P['o2p_redis']}/oauth2/auth", {"Cookie": orc}, True, o2pr.pid))
    cases["forged"] = pair("forged cookie (401)",
                           ("gatehouse", f"{gh_url}/auth/me", {"Cookie": forged_gh}, False, gh.pid),
                           ("oauth2_proxy", f"{o2p_url}/oauth2/auth", {"Cookie": forged_o2p}, False, o2p.pid))
    cases["no_cookie"] = pair("no cookie (401)",
                              ("gatehouse", f"{gh_url}/auth/me", {}, False, gh.pid),
                              ("oauth2_proxy", f"{o2p_url}/oauth2/auth", {}, False, o2p.pid))
    oc = o2p_fresh()
    cases["proxied"] = pair("proxied request",
                            ("gatehouse", f"{gh_url}/api/up/x", {"Cookie": ghc}, True, gh.pid),
                            ("oauth2_proxy", f"{o2p_url}/x", {"Cookie": oc}, True, o2p.pid))
    oc = o2p_fresh()
    cases["gateway"] = pair("nginx auth_request",
                            ("gatehouse", f"http://127.0.0.1:{P['ng_gh']}/app/x", {"Cookie": ghc}, True, gh.pid),
                            ("oauth2_proxy", f"http://127.0.0.1:{P['ng_o2p']}/app/x", {"Cookie": oc}, True, o2p.pid))
    cases["check_vs_me"] = pair("HTTP check vs /auth/me",
                                ("check", f"http://127.0.0.1:{P['gh_check']}/check", check_headers, True, gh.pid),
                                ("auth_me", f"{gh_url}/auth/me", {"Cookie": ghc}, True, gh.pid))

    # Footprint: live sessions. Gatehouse's are minted through its own code (one real Keycloak
    # login, then Exchange::start N times: examples/mint_sessions.rs) and checked through the
    # server; oauth2-proxy can only get sessions by real logins (FOOTPRINT_SESSIONS of them, then
    # extrapolated).
    ss = results["sessions"] = {"n": N_SESSIONS, "live": N_LIVE}
    if MINT and N_LIVE > 0:
        ss["gatehouse_live"] = live_sessions_embedded()
        log("live sessions, embedded:", ss["gatehouse_live"])
        ss["gatehouse_redis_live"] = live_sessions_redis(ghr)
        log("live sessions, Redis:", ss["gatehouse_redis_live"])
    u0, k0 = redis_used(), redis_keys()
    r0 = rss_kib(o2pr.pid)
    t0 = time.time()
    ok = many_logins(lambda: o2p_login(P["o2p_redis"]), N_SESSIONS)
    ss["oauth2_proxy_redis"] = {"ok": ok, "seconds": round(time.time() - t0, 1),
                                "redis_per_session_b": (redis_used() - u0) / max(ok, 1),
                                "keys_per_session": (redis_keys() - k0) / max(ok, 1),
                                "rss_kib": rss_kib(o2pr.pid),
                                "rss_per_session_b": (rss_kib(o2pr.pid) - r0) * 1024 / max(ok, 1)}
    log("sessions:", ss)

    # Footprint: idle keep-alive connections.
    fp = results["connections"] = {}
    fp["gatehouse"] = hold_connections(P["gh"], N_CONNS, "/readyz", gh.pid)
    log("connections, Gatehouse:", fp["gatehouse"])
    fp["oauth2_proxy"] = hold_connections(P["o2p"], N_CONNS, "/ping", o2p.pid)
    log("connections, oauth2-proxy:", fp["oauth2_proxy"])

    Path(OUT_JSON).write_text(json.dumps(results, indent=1))  # partial results, should the storm fail

    # The refresh storm: Keycloak's back channel behind a delaying proxy, 10 s access tokens.
    stats, stop_proxy = delay_proxy(P["kc_delay"], int(urllib.parse.urlparse(KC).port or 80), STORM_DELAY_MS)
    time.sleep(0.3)
    via = f"http://127.0.0.1:{P['kc_delay']}"
    st = results["storm"] = {}
    # Gatehouse's issuer is pinned to Keycloak's own address; its HTTP client (reqwest) honours
    # http_proxy, and the delaying proxy forwards the proxy-form requests to Keycloak unchanged.
    storm_env = {"http_proxy": via, "HTTP_PROXY": via, "no_proxy": "", "NO_PROXY": ""}
    short = 'refresh_skew = "2s"'
    start_gh("gh-storm", P["gh_storm"], "bench-gatehouse-short", "bench-gatehouse-short-secret", "embedded",
                   extra_oidc=short, env=storm_env)
    start_gh("gh-storm-redis", P["gh_storm_redis"], "bench-gatehouse-short", "bench-gatehouse-short-secret",
                    "redis", extra_oidc=short, env=storm_env)
    start_o2p("o2p-storm", P["o2p_storm"], "bench-oauth2-proxy-short", "bench-oauth2-proxy-short-secret",
                   "cookie", refresh="5s", token_url=via)
    start_o2p("o2p-storm-redis", P["o2p_storm_redis"], "bench-oauth2-proxy-short",
                    "bench-oauth2-proxy-short-secret", "redis", refresh="5s", token_url=via)
    c0 = stats["chunks"]
    sessions = {"gatehouse": (gh_login(P["gh_storm"]), f"http://127.0.0.1:{P['gh_storm']}/auth/me", "bench-gatehouse-short"),
                "gatehouse_redis": (gh_login(P["gh_storm_redis"]), f"http://127.0.0.1:{P['gh_storm_redis']}/auth/me", "bench-gatehouse-short"),
                "oauth2_proxy": (o2p_login(P["o2p_storm"]), f"http://127.0.0.1:{P['o2p_storm']}/oauth2/auth", "bench-oauth2-proxy-short"),
                "oauth2_proxy_redis": (o2p_login(P["o2p_storm_redis"]), f"http://127.0.0.1:{P['o2p_storm_redis']}/oauth2/auth", "bench-oauth2-proxy-short")}
    st["kc_chunks_through_delay_proxy_during_logins"] = stats["chunks"] - c0
    time.sleep(12)  # past the 10 s access-token lifetime
    for name, (cookie, url, client) in sessions.items():
        since = int(time.time() * 1000) - 50
        c1 = stats["chunks"]
        t0 = time.time()
        codes = storm(url, cookie, STORM)
        took = time.time() - t0
        time.sleep(1.5)  # Keycloak stores events asynchronously
        ok = sum(v for k, v in codes.items() if 200 <= k < 300)
        st[name] = {"codes": {str(k): v for k, v in codes.items()}, "failed": STORM - ok, "seconds": round(took, 2),
                    "refresh_events": admin.events(client, since, "REFRESH_TOKEN"),
                    "refresh_errors": admin.events(client, since, "REFRESH_TOKEN_ERROR"),
                    "kc_chunks_delayed": stats["chunks"] - c1}
        log("storm", name, st[name])
    stop_proxy.set()

    Path(OUT_JSON).write_text(json.dumps(results, indent=1))
    print(render(results))


# ------------------------------------------------------------------ table

TARGETS = {"session": 5, "forged": 5, "no_cookie": 5, "session_redis": 3, "proxied": 2, "gateway": 3}


def render(r):
    """The side-by-side tables. The targets are judged on the rate per server core (1e6 / server CPU
    µs per request): on a 2-core machine wrk shares core 1 with nginx and the upstream, so the
    closed-loop rate of a fast server is often the load generator's limit, not the server's (the
    "core busy" column shows how much of core 0 the server used)."""
    m = r["meta"]
    lines = [f"Gatehouse vs oauth2-proxy v7.15.6 — each server on core 0 with one worker, wrk/vegeta on core 1, "
             f"{m['connections']} connections, {m['duration_s']} s per run, {m['rounds']} alternating round(s) (median); "
             f"fixed rate {m['fixed_rate']} req/s (vegeta). Targets judged on the per-core rate.", "",
             "| case | req/s GH · o2p (core busy %) | raw ratio | CPU µs/req GH · o2p | req/s per server core GH · o2p | **per-core ratio** | target | "
             f"p50 / p99 ms GH · o2p | p99 ms at {m['fixed_rate']}/s GH · o2p | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"session": "valid session check (`/auth/me` · `/oauth2/auth`)",
             "session_redis": "valid session check, Redis store",
             "forged": "forged cookie → 401", "no_cookie": "no cookie → 401",
             "proxied": "proxied request to the same upstream",
             "gateway": "nginx `auth_request` → check (auth server's CPU per check)"}

    def busy(d):
        return d["rps"] * d["cpu_us_median"] / 1e4

    def fx(d):
        return f"{d['f_p99']:.2f}" if "f_p99" in d else "—"

    for k, label in names.items():
        a, b = r["cases"][k]["gatehouse"], r["cases"][k]["oauth2_proxy"]
        ratio = a["rps"] / b["rps"]
        core_ratio = b["cpu_us_median"] / a["cpu_us_median"] if a["cpu_us_median"] else float("nan")
        lines.append(f"| {label} | {a['rps']:.0f} ({busy(a):.0f} %) · {b['rps']:.0f} ({busy(b):.0f} %) | {ratio:.2f}× | "
                     f"{a['cpu_us_median']:.1f} · {b['cpu_us_median']:.1f} | {1e6 / a['cpu_us_median']:.0f} · {1e6 / b['cpu_us_median']:.0f} | "
                     f"**{core_ratio:.2f}×** | ≥ {TARGETS[k]}× | "
                     f"{a['p50']:.2f}/{a['p99']:.2f} · {b['p50']:.2f}/{b['p99']:.2f} | {fx(a)} · {fx(b)} | "
                     f"{'met' if core_ratio >= TARGETS[k] else 'missed'} |")
    c = r["cases"]["check_vs_me"]
    cr = c["check"]["rps"] / c["auth_me"]["rps"]
    ccr = c["auth_me"]["cpu_us_median"] / c["check"]["cpu_us_median"]
    lines += ["", f"HTTP check (`/check` on the check listener) vs `/auth/me`, same Gatehouse process: "
              f"{c['check']['rps']:.0f} vs {c['auth_me']['rps']:.0f} req/s ({cr * 100:.0f} %), CPU "
              f"{c['check']['cpu_us_median']:.1f} vs {c['auth_me']['cpu_us_median']:.1f} µs: per core **{ccr * 100:.0f} %** "
              f"(target ≥ 90 %: {'met' if ccr >= 0.9 else 'missed'})."]
    ri = r["rss_idle_kib"]
    lines += ["", "| footprint | Gatehouse | oauth2-proxy | ratio | target | met |", "|---|---|---|---|---|---|"]
    ir = ri["gatehouse"] / ri["oauth2_proxy"]
    lines.append(f"| RSS idle (MiB) | {ri['gatehouse'] / 1024:.1f} | {ri['oauth2_proxy'] / 1024:.1f} | {ir:.2f} | ≤ 0.33 | "
                 f"{'met' if ir <= 1 / 3 else 'missed'} |")
    rl = r["rss_after_load_kib"]
    lr = rl["gatehouse"] / rl["oauth2_proxy"]
    lines.append(f"| RSS after the session-check load (MiB) | {rl['gatehouse'] / 1024:.1f} | {rl['oauth2_proxy'] / 1024:.1f} | "
                 f"{lr:.2f} | ≤ 0.33 | {'met' if lr <= 1 / 3 else 'missed'} |")
    cn = r["connections"]
    g, o = cn["gatehouse"], cn["oauth2_proxy"]
    lines.append(f"| KiB per idle keep-alive connection ({g['established']} / {o['established']} of {r['meta']['idle_connections']} held) | "
                 f"{g['kib_per_conn']:.1f} (RSS {g['rss_kib'] / 1024:.0f} MiB) | {o['kib_per_conn']:.1f} (RSS {o['rss_kib'] / 1024:.0f} MiB) | {g['kib_per_conn'] / max(o['kib_per_conn'], 0.01):.2f} | "
                 f"≤ 16 KiB | {'met' if g['kib_per_conn'] <= 16 and g['established'] >= r['meta']['idle_connections'] else 'missed'} |")
    parts = r.get("rss_idle_parts_kib")
    if parts:
        gp, op = parts["gatehouse"], parts["oauth2_proxy"]
        lines.append(f"| RSS idle: anonymous (heap, stacks) · file-backed (code, libraries) (MiB) | "
                     f"{gp['anon'] / 1024:.1f} · {gp['file'] / 1024:.1f} | {op['anon'] / 1024:.1f} · {op['file'] / 1024:.1f} | "
                     f"{gp['anon'] / max(op['anon'], 1):.2f} · {gp['file'] / max(op['file'], 1):.2f} | — | — |")
    s = r["sessions"]
    n, live = s["n"], s.get("live", 0)

    def mib(kib):
        return f"{kib / 1024:.1f}"
    if "gatehouse_live" in s:
        g = s["gatehouse_live"]
        lines.append(f"| embedded store, {live} live sessions (minted, {g['checked']} checked via `/auth/me`): RSS after start · after the sample (MiB, anonymous part); file | "
                     f"{mib(g['rss_after_start']['rss'])} ({mib(g['rss_after_start']['anon'])}) · {mib(g['rss_after_sample']['rss'])} "
                     f"({mib(g['rss_after_sample']['anon'])}); {g['file_bytes'] / 2**20:.0f} MiB = {g['file_per_session_b']:.0f} B/session; "
                     f"start {g['start_seconds']} s | — (cookie store: no server state; the session travels in a "
                     f"{r.get('o2p_cookie_bytes', 0)}-byte cookie) | — | — | — |")
    orr = s["oauth2_proxy_redis"]["redis_per_session_b"]
    if "gatehouse_redis_live" in s:
        g = s["gatehouse_redis_live"]
        gr = g["redis_per_session_b"]
        lines.append(f"| Redis `used_memory` per session, bytes (Gatehouse: {live} live sessions, measured; oauth2-proxy: "
                     f"{n} logins, × 100,000 extrapolated) | {gr:.0f} (= {gr * live / 2**20:.0f} MiB) | "
                     f"{orr:.0f} (≈ {orr * 1e5 / 2**20:.0f} MiB) | {gr / max(orr, 1):.2f} | — | — |")
        lines.append(f"| Redis keys per session | {g['keys_per_session']:.1f} | "
                     f"{s['oauth2_proxy_redis']['keys_per_session']:.1f} | — | — | — |")
        lines.append(f"| process RSS with the sessions in Redis (MiB; Gatehouse before · after minting and a sample of "
                     f"{g['checked']}) | {mib(g['rss_before']['rss'])} · {mib(g['rss_after_sample']['rss'])} | "
                     f"{mib(s['oauth2_proxy_redis']['rss_kib'])} after {n} logins | — | — | — |")
    st = r["storm"]
    STORM, STORM_DELAY_MS = m["storm_requests"], m["storm_delay_ms"]  # noqa: N806
    lines += ["", f"Refresh storm: {STORM} concurrent requests on one session whose 10 s access token has expired, "
              f"Keycloak's back channel behind a TCP proxy adding {STORM_DELAY_MS} ms per request chunk "
              f"({st['kc_chunks_through_delay_proxy_during_logins']} request chunks went through it during the logins). "
              "Target: exactly 1 refresh and 0 failures.", "",
              "| product / store | Keycloak REFRESH_TOKEN | REFRESH_TOKEN_ERROR | failed requests | answers | seconds | chunks delayed | met |",
              "|---|---|---|---|---|---|---|---|"]
    for k in ("gatehouse", "gatehouse_redis", "oauth2_proxy", "oauth2_proxy_redis"):
        x = st[k]
        met = x["refresh_events"] == 1 and x["failed"] == 0
        lines.append(f"| {k.replace('_', ' ')} | {x['refresh_events']} | {x['refresh_errors']} | {x['failed']} | "
                     f"{x['codes']} | {x['seconds']} | {x['kc_chunks_delayed']} | {'met' if met else 'missed'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops what we started
    try:
        main()
    finally:
        stop_all()
        # End the bench user's Keycloak sessions (hundreds of logins) on the shared instance.
        for a in ADMIN:
            try:
                a.logout_user()
            except Exception as e:  # noqa: BLE001 - best effort at exit
                log("could not log the bench user out at Keycloak:", e)
