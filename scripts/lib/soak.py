#!/usr/bin/env python3
"""The soak test of `make soak` (issue 14 part 6). Started by scripts/soak.sh, which builds the
release binary and copies it into the work directory (so another engineer's build cannot replace it
mid-run).

Two Gatehouse replicas (release build) share one redis-server and one Keycloak instance of their
own (`scripts/keycloak.sh start soak PORT`, never the shared `test` instance). Worker threads send
mixed traffic for SOAK_MINUTES: password logins (volume) and real authorization-code logins,
`/auth/me`, proxied `/api` calls (bearer relay to a local upstream that answers 200 only when a
token arrived), East-West exchanges over mutual TLS, logouts and Keycloak back-channel logouts (the
admin API's "log out user", which makes Keycloak POST a logout token to replica A while the
sessions are used on both replicas). Redis, then Keycloak, are stopped and restarted during the run.

What fails the run (exit status 1):
- a lost session: a session that was never ended answers 401 (in traffic or in a sweep; a sweep
  checks every live session on both replicas after warm-up, after each outage and at the end);
- a resurrected session: an ended session (logout, back-channel logout) answers anything but 401,
  on either replica, on `/auth/me` or the exchange;
- an error: any 5xx, connection error or unexpected status outside an outage window (a 503 inside
  one is expected and counted);
- the RSS slope of a replica after warm-up above SOAK_RSS_SLOPE_MAX (KiB/min);
- a panic line, a session id, or a token (anything JWT-shaped) in a replica's log, or an ERROR log
  line outside an outage window.

Each user account belongs to one worker thread, so a user's sessions are only ever touched by one
thread (a back-channel logout ends all of one user's sessions: no other thread can race it). Every
process started here is ended by its own pid at exit, and the Keycloak instance is stopped, also
after a failure or Ctrl-C.
"""

import base64
import html
import http.cookiejar
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

E = os.environ
GH = E["GATEHOUSE_BIN"]
WORK = Path(E["SOAK_WORK"])
REPO = Path(__file__).resolve().parents[2]
MINUTES = float(E.get("SOAK_MINUTES", "30"))
WARMUP_MIN = float(E.get("SOAK_WARMUP_MINUTES", str(min(5.0, MINUTES / 3))))
WORKERS = int(E.get("SOAK_WORKERS", "6"))
USERS_PER_WORKER = int(E.get("SOAK_USERS_PER_WORKER", "3"))
LIVE_PER_WORKER = int(E.get("SOAK_LIVE_PER_WORKER", "40"))
PAUSE = float(E.get("SOAK_PAUSE", "0.02"))  # seconds between a worker's operations
RSS_EVERY = float(E.get("SOAK_RSS_INTERVAL", "10"))
SLOPE_MAX = float(E.get("SOAK_RSS_SLOPE_MAX", "64"))  # KiB/min, see docs/benchmarks.md#soak
REDIS_DOWN_S = float(E.get("SOAK_REDIS_DOWN_SECONDS", "20"))
GRACE_S = float(E.get("SOAK_OUTAGE_GRACE_SECONDS", "5"))
# 1 = the self-test: after warm-up, delete one session from Redis behind Gatehouse's back and
# pretend one live session was logged out; the run must then FAIL with 1 lost and 1 resurrected.
INJECT = E.get("SOAK_INJECT_FAULTS", "0") == "1"
KC_PORT = int(E.get("SOAK_KEYCLOAK_PORT", "18280"))
# The client's access-token lifespan (Keycloak's default for the realm is 300 s): short, so that
# every session refreshes many times in a run, and so that a back-channel logout missed during an
# outage is caught up with soon (see Worker.backchannel).
TOKEN_LIFESPAN = int(E.get("SOAK_TOKEN_LIFESPAN", "120"))
REFRESH_SKEW = 30  # Gatehouse's default oidc.refresh_skew
KC_NAME = "soak"
KC = f"http://localhost:{KC_PORT}"
REALM = "gatehouse"
ISSUER = f"{KC}/realms/{REALM}"
CLIENT, SECRET = "gatehouse", "gatehouse-dev-secret"
A_PORT, B_PORT, A_INT, B_INT = KC_PORT + 1, KC_PORT + 2, KC_PORT + 3, KC_PORT + 4
REDIS_PORT, UP_PORT = KC_PORT + 5, KC_PORT + 6
REPLICAS = {"A": (A_PORT, A_INT), "B": (B_PORT, B_INT)}
COOKIE = "__Host-Http-gatehouse"
CALLER = "spiffe://gatehouse.local/ns/soak/sa/driver"
# Passed with every request: set as a requests.Session attribute, verify was not always applied.
TLS = dict(cert=(str(WORK / "pki/soak.crt"), str(WORK / "pki/soak.key")), verify=str(WORK / "pki/ca.crt"))


def log(*a):
    print(f"soak [{time.strftime('%H:%M:%S')}]:", *a, file=sys.stderr, flush=True)


def no_cookies(s):
    # Each request carries exactly the cookie the driver chooses; nothing is remembered.
    s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return s


# ------------------------------------------------------------------ processes

procs = {}  # name -> Popen


def start(name, argv, env=None):
    if STOP.is_set():  # an outage thread must not restart anything once the cleanup has begun
        return None
    e = dict(os.environ)
    e.update(env or {})
    out = open(WORK / f"{name}.log", "a")
    p = subprocess.Popen(argv, env=e, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs[name] = p
    return p


def stop(name):
    p = procs.pop(name, None)
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def keycloak(action, keep_db=False):
    if action == "start" and STOP.is_set():
        return
    argv = [str(REPO / "scripts/keycloak.sh"), action, KC_NAME] + ([str(KC_PORT)] if action == "start" else [])
    env = dict(os.environ, KEYCLOAK_KEEP_DB="1" if keep_db else "0")
    subprocess.run(argv, env=env, check=True)


def wait_ok(url, timeout=120, **kw):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if requests.get(url, timeout=3, **kw).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ Keycloak admin

class Admin:
    def __init__(self):
        self.base = f"{KC}/admin/realms/{REALM}"
        self._at, self._h = 0.0, {}
        self.lock = threading.Lock()

    @property
    def h(self):
        with self.lock:
            if time.time() - self._at > 30:  # master-realm admin tokens live 60 s
                r = requests.post(f"{KC}/realms/master/protocol/openid-connect/token", timeout=10,
                                  data=dict(grant_type="password", client_id="admin-cli", username="admin",
                                            password="admin"))
                r.raise_for_status()
                self._h = {"Authorization": "Bearer " + r.json()["access_token"]}
                self._at = time.time()
            return self._h

    def get(self, path, **params):
        r = requests.get(self.base + path, headers=self.h, params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def setup_client(self):
        """Redirect URIs for the replicas' ports and the back-channel logout URL on replica A."""
        c = self.get("/clients", clientId=CLIENT)[0]
        c["redirectUris"] = [f"http://localhost:{p}/auth/callback" for p in (A_PORT, B_PORT)]
        c["frontchannelLogout"] = False
        c.setdefault("attributes", {}).update({
            "backchannel.logout.url": f"http://localhost:{A_PORT}/auth/backchannel-logout",
            "backchannel.logout.session.required": "true",
            "access.token.lifespan": str(TOKEN_LIFESPAN),
        })
        requests.put(f"{self.base}/clients/{c['id']}", headers=self.h, json=c, timeout=10).raise_for_status()

    def ensure_user(self, name):
        body = {"username": name, "enabled": True, "email": f"{name}@example.com", "emailVerified": True,
                "firstName": "Soak", "lastName": name, "requiredActions": []}
        found = self.get("/users", username=name, exact="true")
        if not found:
            requests.post(f"{self.base}/users", headers=self.h, json=body, timeout=10).raise_for_status()
            found = self.get("/users", username=name, exact="true")
        uid = found[0]["id"]
        requests.put(f"{self.base}/users/{uid}/reset-password", headers=self.h, timeout=10,
                     json={"type": "password", "value": f"{name}-password", "temporary": False}).raise_for_status()
        return uid

    def logout_user(self, uid):
        r = requests.post(f"{self.base}/users/{uid}/logout", headers=self.h, timeout=30)
        r.raise_for_status()


# ------------------------------------------------------------------ the upstream of the /api route

class Upstream(BaseHTTPRequestHandler):
    """200 only when Gatehouse relayed a bearer token; 401 otherwise (counted as an error)."""

    def do_GET(self):
        ok = self.headers.get("authorization", "").startswith("Bearer eyJ")
        body = b'{"ok":true}' if ok else b'{"ok":false}'
        self.send_response(200 if ok else 401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


# ------------------------------------------------------------------ bookkeeping

class Stats:
    """Every request to Gatehouse: (start, end, op, status), classified at the end against the
    outage windows (known only afterwards for the window that is still open)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (t0, t1, op, status)  status: int or "conn"
        self.windows = []  # [name, start, end or None]
        self.failures = []  # (time, kind, text)
        self.lost = set()
        self.resurrected = set()
        self.created = {"password": 0, "code": 0}
        self.ended = {"logout": 0, "backchannel": 0, "injected: never logged out": 0}
        # Back-channel logouts Keycloak sent while Redis was down: Gatehouse could not record them
        # (503) and Keycloak does not retry, so the session ends at its next refresh instead.
        self.missed = []  # Sess
        self.missed_delays = []  # seconds from the admin logout to the first 401
        self.skipped = 0
        self.tokens = set()
        self.conn_errors = {}  # op -> first connection error text

    def req(self, t0, op, status):
        with self.lock:
            self.requests.append((t0, time.time(), op, status))

    def fail(self, kind, text):
        with self.lock:
            self.failures.append((time.time(), kind, text))
        log(f"FAIL {kind}: {text}")

    def in_window(self, t0, t1):
        for name, s, e in self.windows:
            if t1 >= s and t0 <= (e if e is not None else float("inf")):
                return name
        return None


ST = Stats()
STOP = threading.Event()
PAUSED = threading.Event()  # set: workers hold still (a sweep is running)


class Sess:
    __slots__ = ("sid", "user", "born", "state", "how", "ended_at", "pending")

    def __init__(self, sid, user, born):
        self.sid, self.user, self.born, self.state, self.how = sid, user, born, "live", None
        self.ended_at, self.pending = None, False

    def deadline(self):
        """For a back-channel logout missed in an outage: the latest time the session may still
        answer 200 (its access token, issued at the latest when the outage ended, expires and the
        refresh fails); None while the outage lasts."""
        for _, a, b in ST.windows:
            if a <= self.ended_at <= (b if b is not None else float("inf")):
                return None if b is None else b + TOKEN_LIFESPAN + 60
        return self.ended_at + TOKEN_LIFESPAN + 60


def set_cookies(r):
    return [v for k, v in r.raw.headers.items() if k.lower() == "set-cookie"]


def cookie_from(r, name):
    for sc in set_cookies(r):
        k, _, v = sc.split(";", 1)[0].partition("=")
        if k == name and v:
            return v
    return None


class Worker(threading.Thread):
    def __init__(self, idx, users, admin):
        super().__init__(daemon=True, name=f"w{idx}")
        self.rng = random.Random(idx * 7919 + int(time.time()))
        self.users = users  # [(name, uid)]
        self.admin = admin
        self.live, self.ended = [], []
        self.busy = threading.Lock()  # held during one operation; a sweep takes all of them
        self.http = no_cookies(requests.Session())
        self.mtls = no_cookies(requests.Session())

    # -- one request, recorded
    def call(self, op, method, url, session=None, **kw):
        t0 = time.time()
        try:
            r = (session or self.http).request(method, url, timeout=30, allow_redirects=False, **kw)
        except requests.RequestException as e:
            ST.req(t0, op, "conn")
            with ST.lock:
                ST.conn_errors.setdefault(op, str(e)[:300])
            return None, str(e)
        ST.req(t0, op, r.status_code)
        if r.status_code == 503:
            time.sleep(0.25)  # a client honouring Retry-After backs off (a little, to keep probing)
        return r, None

    def me(self, s, rep, op="me"):
        r, _ = self.call(op, "GET", f"http://127.0.0.1:{REPLICAS[rep][0]}/auth/me",
                         headers={"Cookie": f"{COOKIE}={s.sid}"})
        return r.status_code if r is not None else "conn"

    def proxied(self, s, rep):
        r, _ = self.call("proxy", "GET", f"http://127.0.0.1:{REPLICAS[rep][0]}/api/up/v1/items?x=1",
                         headers={"Cookie": f"{COOKIE}={s.sid}"})
        return r.status_code if r is not None else "conn"

    def exchange(self, s, rep, op="exchange"):
        r, _ = self.call(op, "POST", f"https://localhost:{REPLICAS[rep][1]}/internal/v1/session/exchange",
                         session=self.mtls, json={"session_id": s.sid}, **TLS)
        if r is None:
            return "conn"
        if r.status_code == 200:
            tok = r.json().get("access_token")
            if tok and len(ST.tokens) < 5000:
                with ST.lock:
                    ST.tokens.add(tok)
        return r.status_code

    # -- expectations
    def expect_live(self, s, status, what):
        if status == 200:
            return
        if status == 401:
            if s.sid not in ST.lost:
                ST.lost.add(s.sid)
                ST.fail("lost", f"{what}: session of {s.user} (born {time.time() - s.born:.0f}s ago) answered 401")
            s.state = "lost"
            self.live.remove(s)
        # 5xx/other: classified later against the outage windows

    def expect_dead(self, s, status, what):
        if status == 401:
            if s.pending:
                s.pending = False
                with ST.lock:
                    ST.missed_delays.append(time.time() - s.ended_at)
            return True
        if status == 200 and s.pending:
            d = s.deadline()
            if d is None or time.time() < d:
                return True  # not yet refreshed: allowed until the deadline
        if status == 200:
            ST.resurrected.add(s.sid)
            ST.fail("resurrected", f"{what}: session of {s.user} ended by {s.how} answered 200")
        return False

    # -- operations
    def login_password(self):
        name, _ = self.rng.choice(self.users)
        rep = self.rng.choice("AB")
        port = REPLICAS[rep][0]
        r, _ = self.call("login_password", "POST", f"http://127.0.0.1:{port}/auth/login",
                         json={"username": name, "password": f"{name}-password"},
                         headers={"X-CSRF": "1", "Origin": f"http://localhost:{port}"})
        if r is not None and r.status_code == 200:
            sid = cookie_from(r, COOKIE)
            if not sid:
                ST.fail("error", "password login: 200 without a session cookie")
                return
            self.live.append(Sess(sid, name, time.time()))
            ST.created["password"] += 1

    def login_code(self):
        """A real authorization-code login: Gatehouse /auth/login -> Keycloak's form -> callback."""
        name, _ = self.rng.choice(self.users)
        rep = self.rng.choice("AB")
        port = REPLICAS[rep][0]
        base = f"http://localhost:{port}"
        r, _ = self.call("login_code", "GET", f"{base}/auth/login?return_to=%2F")
        if r is None or r.status_code != 303:
            return
        state_cookies = "; ".join(sc.split(";", 1)[0] for sc in set_cookies(r))
        kc = requests.Session()  # Keycloak's own cookies; not Gatehouse traffic
        try:
            page = kc.get(r.headers["location"], timeout=30)
            m = re.search(r'<form[^>]*id="kc-form-login"[^>]*action="([^"]+)"', page.text)
            if not m:
                raise RuntimeError(f"no login form ({page.status_code})")
            for c in kc.cookies:
                c.secure = False  # Keycloak marks them Secure; browsers send them to http://localhost
            posted = kc.post(html.unescape(m.group(1)), allow_redirects=False, timeout=30,
                             data={"username": name, "password": f"{name}-password", "credentialId": ""})
            callback = posted.headers.get("location", "")
            if posted.status_code != 302 or not callback.startswith(f"{base}/auth/callback?"):
                raise RuntimeError(f"Keycloak answered {posted.status_code} -> {callback[:80]}")
        except (requests.RequestException, RuntimeError) as e:
            if ST.windows and ST.windows[-1][2] is None:
                ST.skipped += 1  # Keycloak itself is down
            else:
                ST.fail("error", f"code-flow login at Keycloak: {e}")
            return
        cb, _ = self.call("login_code", "GET", callback.replace("localhost", "127.0.0.1", 1),
                          headers={"Cookie": state_cookies})
        if cb is not None and cb.status_code == 303:
            sid = cookie_from(cb, COOKIE)
            if not sid:
                ST.fail("error", "code-flow callback: 303 without a session cookie")
                return
            self.live.append(Sess(sid, name, time.time()))
            ST.created["code"] += 1

    def logout(self):
        s = self.rng.choice(self.live)
        port = REPLICAS[self.rng.choice("AB")][0]
        r, _ = self.call("logout", "POST", f"http://127.0.0.1:{port}/auth/logout",
                         headers={"Cookie": f"{COOKIE}={s.sid}", "X-CSRF": "1", "Origin": f"http://localhost:{port}"})
        if r is not None and r.status_code == 200:
            self.end(s, "logout")
            other = "B" if port == A_PORT else "A"
            self.expect_dead(s, self.me(s, other, "check_ended"), "right after logout, other replica")
        elif r is not None and r.status_code == 401:
            self.expect_live(s, 401, "logout")

    def backchannel(self):
        users = [u for u in self.users if any(s.user == u[0] for s in self.live)]
        if not users:
            return
        name, uid = self.rng.choice(users)
        try:
            self.admin.logout_user(uid)
        except requests.RequestException as e:
            if ST.windows and ST.windows[-1][2] is None:
                ST.skipped += 1
            else:
                ST.fail("error", f"Keycloak admin logout: {e}")
            return
        issued = time.time()
        mine = [s for s in self.live if s.user == name]
        for s in mine:
            self.end(s, "backchannel")
        # Keycloak delivers the logout token to replica A before answering; give it 10 s anyway.
        deadline = time.time() + 10
        for s in mine:
            for rep in "AB":
                while True:
                    st = self.me(s, rep, "check_ended")
                    if st == 401 or time.time() > deadline:
                        break
                    time.sleep(0.1)
                if st != 401 and ST.in_window(issued, time.time()) == "redis":
                    # Gatehouse answered Keycloak's delivery with 503; Keycloak does not retry.
                    if not s.pending:
                        s.pending = True
                        with ST.lock:
                            ST.missed.append(s)
                    continue
                self.expect_dead(s, st, f"back-channel logout on replica {rep}")

    def end(self, s, how):
        s.state, s.how, s.ended_at = "ended", how, time.time()
        self.live.remove(s)
        self.ended.append(s)
        ST.ended[how] += 1

    def check_ended(self):
        s = self.rng.choice(self.ended)
        rep = self.rng.choice("AB")
        if self.rng.random() < 0.5:
            self.expect_dead(s, self.me(s, rep, "check_ended"), f"/auth/me on {rep}")
        else:
            self.expect_dead(s, self.exchange(s, rep, "check_ended"), f"exchange on {rep}")

    def use(self, kind):
        s = self.rng.choice(self.live)
        rep = self.rng.choice("AB")
        st = {"me": self.me, "proxy": self.proxied, "exchange": self.exchange}[kind](s, rep)
        self.expect_live(s, st, f"{kind} on {rep}")

    def step(self):
        live, want = len(self.live), LIVE_PER_WORKER
        ops = [
            ("login_password", 10 if live < want else 1),
            ("login_code", 1 if live < want else 0.1),
            ("me", 30 if live else 0),
            ("proxy", 15 if live else 0),
            ("exchange", 10 if live else 0),
            ("logout", (4 if live > want * 0.8 else 0.5) if live else 0),
            ("backchannel", 0.3 if live > want * 0.8 else 0),
            ("check_ended", 4 if self.ended else 0),
        ]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        if op in ("me", "proxy", "exchange"):
            self.use(op)
        else:
            getattr(self, op)()

    def run(self):
        while not STOP.is_set():
            if PAUSED.is_set():
                time.sleep(0.05)
                continue
            with self.busy:
                try:
                    self.step()
                except Exception as e:  # a driver bug must not pass silently
                    ST.fail("driver", f"{type(e).__name__}: {e}")
            time.sleep(PAUSE)


def sweep_one(w, label, out):
    """One worker's sessions: every live one works on both replicas (me + exchange), every ended
    one is dead on both."""
    bad = 0
    for s in list(w.live):
        for rep in "AB":
            for kind, fn in (("me", w.me), ("exchange", w.exchange)):
                st = fn(s, rep, "sweep")
                if st != 200:
                    bad += 1
                    if s.sid not in ST.lost:
                        ST.lost.add(s.sid)
                        ST.fail("lost", f"sweep {label}: live session of {s.user} {kind} on {rep} -> {st}")
    for s in w.ended:
        for rep in "AB":
            bad += not w.expect_dead(s, w.me(s, rep, "sweep"), f"sweep {label} /auth/me on {rep}")
            bad += not w.expect_dead(s, w.exchange(s, rep, "sweep"), f"sweep {label} exchange on {rep}")
    out.append((len(w.live), len(w.ended), bad))


def sweep(workers, label):
    """With the workers held still (no session changes state during it), every session is checked,
    one thread per worker."""
    PAUSED.set()
    for w in workers:
        w.busy.acquire()
    try:
        t0 = time.time()
        out = []
        threads = [threading.Thread(target=sweep_one, args=(w, label, out)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        n_live, n_dead, bad = (sum(x[i] for x in out) for i in range(3))
        log(f"sweep {label}: {n_live} live and {n_dead} ended sessions checked on both replicas, "
            f"{bad} wrong answers ({time.time() - t0:.0f}s)")
        return {"label": label, "live": n_live, "ended": n_dead, "bad": bad}
    finally:
        for w in workers:
            w.busy.release()
        PAUSED.clear()


def inject_faults(workers):
    PAUSED.set()
    for w in workers:
        w.busy.acquire()
    try:
        keys = subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "--scan", "--pattern", "gatehouse:s:*"],
                              capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "del", keys[0]], check=True, stdout=subprocess.DEVNULL)
        w = next(w for w in workers if w.live)
        w.end(w.live[-1], "injected: never logged out")
        log("self-test: one session deleted in Redis, one live session marked ended without a logout")
    finally:
        for w in workers:
            w.busy.release()
        PAUSED.clear()


# ------------------------------------------------------------------ outages

def replicas_ready(timeout=120):
    return all(wait_ok(f"http://127.0.0.1:{p}/readyz", timeout) for p, _ in REPLICAS.values())


def redis_argv():
    return ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(WORK / "redis")]


def outage_redis():
    log(f"outage: stopping Redis (SIGTERM: it flushes its AOF) for {REDIS_DOWN_S:.0f}s")
    w = ["redis", time.time(), None]
    ST.windows.append(w)
    stop("redis")
    time.sleep(REDIS_DOWN_S)
    start("redis", redis_argv())
    ok = replicas_ready()
    time.sleep(GRACE_S)
    w[2] = time.time()
    log(f"outage: Redis back, replicas ready={ok}; window {w[2] - w[1]:.0f}s")
    if not ok:
        ST.fail("error", "replicas not ready 120 s after Redis came back")


def outage_keycloak():
    log("outage: stopping Keycloak (database kept: its sessions and keys survive, like a real restart)")
    w = ["keycloak", time.time(), None]
    ST.windows.append(w)
    keycloak("stop")
    time.sleep(REDIS_DOWN_S)
    keycloak("start", keep_db=True)
    ok = replicas_ready()
    time.sleep(GRACE_S)
    w[2] = time.time()
    log(f"outage: Keycloak back; window {w[2] - w[1]:.0f}s")
    if not ok:
        ST.fail("error", "replicas not ready 120 s after Keycloak came back")


# ------------------------------------------------------------------ logs

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")
WORD = re.compile(r"[A-Za-z0-9_-]{20,}")


def check_logs(workers):
    ids = {s.sid for w in workers for s in w.live + w.ended} | ST.lost
    out = {"lines": 0, "panics": 0, "secrets": 0, "errors_in_window": 0, "errors_outside": 0, "warns": 0,
           "bcl": 0, "bcl_sessions": 0}
    for name in ("gh-a", "gh-b"):
        for line in (WORK / f"{name}.log").read_text(errors="replace").splitlines():
            out["lines"] += 1
            if "panicked" in line or "RUST_BACKTRACE" in line:
                out["panics"] += 1
                ST.fail("panic", f"{name}: {line[:300]}")
            words = set(WORD.findall(line))
            # Access tokens are JWTs: the pattern catches every one of them (and refresh/ID tokens).
            if JWT.search(line) or words & ids:
                out["secrets"] += 1
                ST.fail("secret in log", f"{name}: a session id or token in a log line (line not shown)")
            try:
                j = json.loads(line)
            except ValueError:
                continue
            lvl = j.get("level", "")
            if j.get("fields", {}).get("message") == "back-channel logout: sessions ended":
                out["bcl"] += 1
                out["bcl_sessions"] += int(j["fields"].get("sessions", 0))
            if lvl == "WARN":
                out["warns"] += 1
            if lvl == "ERROR":
                t = datetime.fromisoformat(j["timestamp"].replace("Z", "+00:00")).timestamp()
                if ST.in_window(t - 1, t + 1):
                    out["errors_in_window"] += 1
                else:
                    out["errors_outside"] += 1
                    ST.fail("error log", f"{name}: {line[:300]}")
    return out


# ------------------------------------------------------------------ RSS

def slope_kib_per_min(samples):
    """Least-squares slope of (t seconds, rss KiB) in KiB/min, and its standard error."""
    n = len(samples)
    if n < 3:
        return float("nan"), float("nan")
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if not var:
        return float("nan"), float("nan")
    b = sum((t - mt) * (r - mr) for t, r in samples) / var
    resid = sum((r - mr - b * (t - mt)) ** 2 for t, r in samples)
    se = (resid / (n - 2) / var) ** 0.5
    return b * 60, se * 60


# ------------------------------------------------------------------ main

def config(name, port, internal):
    return f"""[public]
listen = "127.0.0.1:{port}"
external_url = "http://localhost:{port}"
[oidc]
issuer = "{ISSUER}"
client_id = "{CLIENT}"
client_secret = "{SECRET}"
password_login = true
password_login_per_ip_per_minute = 1000000
password_login_per_user_per_minute = 1000000
[session]
store = "redis"
redis_url = "redis://127.0.0.1:{REDIS_PORT}"
encryption_key_file = "{WORK}/session.key"
[internal]
listen = "127.0.0.1:{internal}"
cert = "{WORK}/pki/gatehouse.crt"
key = "{WORK}/pki/gatehouse.key"
client_ca = "{WORK}/pki/ca.crt"
allow = ["{CALLER}"]
rate_limit_per_second = 100000
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
level = "info"
[[routes]]
prefix = "/api/up/"
upstream = "http://127.0.0.1:{UP_PORT}/"
relay = "bearer"
"""


def main():
    t_begin = time.time()
    log(f"{MINUTES:g} min, warm-up {WARMUP_MIN:g} min, {WORKERS} workers x {USERS_PER_WORKER} users, "
        f"~{LIVE_PER_WORKER * WORKERS} live sessions; Keycloak '{KC_NAME}' on {KC_PORT}, replicas on {A_PORT}/{B_PORT}")
    keycloak("start")
    admin = Admin()
    admin.setup_client()
    names = [f"soak-{i}" for i in range(WORKERS * USERS_PER_WORKER)]
    uids = {n: admin.ensure_user(n) for n in names}

    (WORK / "redis").mkdir(exist_ok=True)
    (WORK / "session.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (WORK / "session.key").chmod(0o600)
    subprocess.run([GH, "pki", "init", "--out", str(WORK / "pki")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([GH, "pki", "issue", "--ca", str(WORK / "pki"), "--name", "soak", "--spiffe", CALLER,
                    "--out", str(WORK / "pki")], check=True, stdout=subprocess.DEVNULL)
    up = ThreadingHTTPServer(("127.0.0.1", UP_PORT), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    start("redis", redis_argv())
    for rep, (port, internal) in REPLICAS.items():
        cfg = WORK / f"gh-{rep.lower()}.toml"
        cfg.write_text(config(rep, port, internal))
        start(f"gh-{rep.lower()}", [GH, "serve", "--config", str(cfg)])
    if not replicas_ready():
        raise SystemExit("replicas not ready; see their logs in " + str(WORK))
    pids = {rep: procs[f"gh-{rep.lower()}"].pid for rep in REPLICAS}

    users = [(n, uids[n]) for n in names]
    workers = [Worker(i, users[i * USERS_PER_WORKER:(i + 1) * USERS_PER_WORKER], admin) for i in range(WORKERS)]
    t0 = time.time()
    for w in workers:
        w.start()
    total = MINUTES * 60
    plan = [(max(WARMUP_MIN * 60, 0.35 * total), outage_redis), (0.65 * total, outage_keycloak)]
    rss = []  # (t, {rep: kib})
    sweeps = []
    next_rss = t0
    swept_warm = False
    while time.time() - t0 < total:
        now = time.time()
        for rep, pid in pids.items():
            if procs[f"gh-{rep.lower()}"].poll() is not None:
                ST.fail("crash", f"replica {rep} exited with {procs[f'gh-{rep.lower()}'].returncode}")
                raise SystemExit(1)
        if now >= next_rss:
            rss.append((now - t0, {rep: rss_kib(pid) for rep, pid in pids.items()}))
            next_rss += RSS_EVERY
        if not swept_warm and now - t0 >= WARMUP_MIN * 60 - 5:
            sweeps.append(sweep(workers, "after warm-up"))
            swept_warm = True
            if INJECT:
                inject_faults(workers)
        if plan and now - t0 >= plan[0][0]:
            _, fn = plan.pop(0)
            th = threading.Thread(target=fn, daemon=True)
            th.start()
            while th.is_alive():  # keep sampling RSS during the outage
                if time.time() >= next_rss:
                    rss.append((time.time() - t0, {rep: rss_kib(pid) for rep, pid in pids.items()}))
                    next_rss += RSS_EVERY
                th.join(0.5)
            sweeps.append(sweep(workers, f"after the {ST.windows[-1][0]} outage"))
        time.sleep(0.2)
    # Sessions whose back-channel logout was missed in the Redis outage must be dead by their
    # deadline: keep the traffic going until the last deadline has passed.
    while any(s.pending and (s.deadline() or 0) > time.time() for s in ST.missed):
        left = max((s.deadline() or 0) for s in ST.missed if s.pending) - time.time()
        log(f"waiting {left:.0f}s for sessions whose back-channel logout was missed in the outage to refresh")
        time.sleep(min(30.0, max(left, 0.1)))
    STOP.set()
    for w in workers:
        w.join(60)
    sweeps.append(sweep(workers, "at the end"))
    logs = check_logs(workers)
    report(t_begin, t0, workers, rss, sweeps, logs)


def report(t_begin, t0, workers, rss, sweeps, logs):
    # Requests, classified against the outage windows.
    by_op = {}
    errors = 0
    for a, b, op, st in ST.requests:
        row = by_op.setdefault(op, {"n": 0, "2xx/3xx": 0, "401": 0, "503 in outage": 0, "other": 0})
        row["n"] += 1
        win = ST.in_window(a, b)
        if st == "conn" or (isinstance(st, int) and st >= 500):
            if st == 503 and win:
                row["503 in outage"] += 1
            else:
                row["other"] += 1
                errors += 1
        elif st == 401:
            row["401"] += 1
        elif st < 400:
            row["2xx/3xx"] += 1
        else:
            row["other"] += 1
            errors += 1
    if errors:
        bad = {}
        for a, b, op, st in ST.requests:
            if (st == "conn" or st >= 400) and st != 401 and not (st == 503 and ST.in_window(a, b)):
                bad[(op, st)] = bad.get((op, st), 0) + 1
        ST.fail("error", f"{errors} unexpected answers outside the outage windows (or not 503): {bad}")
    per_window = {}
    for a, b, op, st in ST.requests:
        if st == 503:
            win = ST.in_window(a, b)
            if win:
                per_window[win] = per_window.get(win, 0) + 1
    dur = (time.time() - t0) / 60

    warm = [(t, r) for t, r in rss if t >= WARMUP_MIN * 60]
    fits = {rep: slope_kib_per_min([(t, r[rep]) for t, r in warm]) for rep in REPLICAS}
    slopes = {rep: f[0] for rep, f in fits.items()}
    n_req = len(ST.requests)
    # What a slope means per request: each replica serves about half of the requests.
    per_rep_per_min = n_req / 2 / max(dur, 1e-9)
    for rep, s in slopes.items():
        if not s <= SLOPE_MAX:
            ST.fail("rss", f"replica {rep}: RSS slope {s:.1f} KiB/min after warm-up > {SLOPE_MAX:g}")

    p = print
    p(f"\n## Soak: {dur:.1f} min of traffic, {n_req} requests ({n_req / dur / 60:.0f}/s), two replicas on Redis\n")
    p("| operation | requests | 2xx/3xx | 401 | 503 in an outage | other (errors) |")
    p("|---|---:|---:|---:|---:|---:|")
    for op in sorted(by_op):
        r = by_op[op]
        p(f"| {op} | {r['n']} | {r['2xx/3xx']} | {r['401']} | {r['503 in outage']} | {r['other']} |")
    p("\n| outage | window (s) | 503s in it |")
    p("|---|---:|---:|")
    for name, s, e in ST.windows:
        p(f"| {name} restart | {(e or time.time()) - s:.0f} | {per_window.get(name, 0)} |")
    live = sum(len(w.live) for w in workers)
    p("\n| sessions | count |")
    p("|---|---:|")
    p(f"| created by password login | {ST.created['password']} |")
    p(f"| created by code-flow login | {ST.created['code']} |")
    p(f"| ended by logout | {ST.ended['logout']} |")
    p(f"| ended by Keycloak back-channel logout | {ST.ended['backchannel']} |")
    p(f"| live at the end (all working on both replicas) | {live} |")
    p(f"| **lost** (live session answered 401 or failed a sweep) | **{len(ST.lost)}** |")
    p(f"| **resurrected** (ended session answered 200) | **{len(ST.resurrected)}** |")
    swept = "; ".join(f"{s['label']}: {s['live']} live + {s['ended']} ended, {s['bad']} wrong" for s in sweeps)
    p(f"| sweeps (every live and ended session, both replicas) | {swept} |")
    pend = [s for s in ST.missed if s.pending]
    delays = ST.missed_delays
    p(f"| back-channel logouts missed in the Redis outage (sessions; Gatehouse answered 503, Keycloak does not retry) | "
      f"{len(ST.missed)} |")
    p(f"| ... of them seen dead, never seen alive past outage end + {TOKEN_LIFESPAN + 60}s (latest first sighting of the 401, s after the logout) | "
      f"{len(delays)} ({max(delays) if delays else 0:.0f}s) |")
    if pend:
        ST.fail("resurrected", f"{len(pend)} sessions whose back-channel logout was missed were never seen dead")
    p(f"| Keycloak-side steps skipped while Keycloak was down | {ST.skipped} |")
    p("\n| replica | RSS start (KiB) | after warm-up | end | max | slope after warm-up (KiB/min, ± std. error) | = bytes/request | limit |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|")
    for rep in REPLICAS:
        vals = [r[rep] for _, r in rss]
        wv = [r[rep] for _, r in warm] or [0]
        p(f"| {rep} | {vals[0]} | {wv[0]} | {vals[-1]} | {max(vals)} | {slopes[rep]:+.1f} ± {fits[rep][1]:.1f} | {slopes[rep] * 1024 / per_rep_per_min:+.2f} | {SLOPE_MAX:g} |")
    p(f"\n| logs (both replicas) | count |\n|---|---:|\n| lines | {logs['lines']} |\n| panic lines | {logs['panics']} |"
      f"\n| lines with a session id or token | {logs['secrets']} |\n| ERROR lines in an outage window | {logs['errors_in_window']} |"
      f"\n| ERROR lines outside | {logs['errors_outside']} |\n| WARN lines | {logs['warns']} |"
      f"\n| back-channel logout tokens accepted (sessions ended by them) | {logs['bcl']} ({logs['bcl_sessions']}) |")
    for op, text in ST.conn_errors.items():
        p(f"\nfirst connection error of {op}: {text}")
    kinds = {}
    for _, k, _ in ST.failures:
        kinds[k] = kinds.get(k, 0) + 1
    verdict = "PASS" if not ST.failures else f"FAIL ({kinds})"
    p(f"\nResult: **{verdict}** (RSS samples every {RSS_EVERY:g}s: {len(rss)}; total run {(time.time() - t_begin) / 60:.1f} min)")
    (WORK / "rss.json").write_text(json.dumps(rss))
    return not ST.failures


def cleanup():
    STOP.set()
    for name in list(procs):
        stop(name)
    try:
        keycloak("stop")
    except Exception as e:  # noqa: BLE001 - report and go on: cleanup must finish
        log(f"stopping Keycloak failed: {e}")


def on_term(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_term)
    code = 1
    try:
        main()
        code = 0 if not ST.failures else 1
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code:
            log(str(e.code))
    finally:
        cleanup()
    sys.exit(code)
