#!/usr/bin/env python3
"""Where a Gatehouse request's CPU goes, by layer: reads `perf script` output of a profile taken
with DWARF call graphs and puts every sample in the first category its stack matches, leaf first
(a kernel leaf counts as kernel; an inlined generic frame such as `poll<...>` is matched by its
name only, not by its type arguments). Categories are matched on symbol names, so the split is
approximate; with a measured CPU µs per request as the second argument it prints µs per layer.

    perf record -F 999 --call-graph dwarf,32768 -o perf.data -p PID -- sleep 4   # under load
    perf script -i perf.data > perf.txt
    python3 scripts/lib/perf_split.py perf.txt [CPU-US-PER-REQUEST]

Used for the ext_authz gRPC face vs `/auth/me` in docs/benchmarks.md (issue 12 part 6).
"""
import collections
import re
import sys

# Classify each sample by the innermost frame that matches a category (leaf first).
CATS = [
 ("kernel: socket I/O, scheduling", lambda s, k: k),
 ("session core (Exchange::resolve: store read, unseal, decode, token envelope)", lambda s, k: "Exchange::resolve" in s or "exchange::Exchange" in s or "session::" in s),
 ("ext_authz adapter (grpc.rs: headers in, answer out)", lambda s, k: "check::grpc::" in s and "Authorization>::check" not in s),
 ("check decide (CSRF, cookie, claims) outside the core", lambda s, k: "check::decide" in s),
 ("HTTP check handler (http.rs)", lambda s, k: "check::http::" in s),
 ("/auth/me handler", lambda s, k: "public::" in s and "auth" in s),
 ("protobuf decode (prost/tonic)", lambda s, k: "Decoder" in s or "decode::Streaming" in s or "prost::encoding" in s and "decode" in s or "Message::decode" in s or "merge" in s and "envoy_types" in s),
 ("protobuf encode (prost/tonic)", lambda s, k: "Encoder" in s or "encode::" in s and "tonic" in s or "Message::encode" in s or "encoded_len" in s),
 ("tonic server glue", lambda s, k: "tonic::" in s or "tonic_prost" in s or "authorization_server" in s or "Authorization>::check" in s),
 ("HTTP/2 (h2: framing, HPACK, streams)", lambda s, k: s.startswith("h2::") or "<h2::" in s or "h2::" in s[:40]),
 ("HTTP/1 (hyper h1)", lambda s, k: "proto::h1" in s),
 ("hyper (other)", lambda s, k: "hyper" in s),
 ("middleware (key/mTLS check, telemetry, tower-http)", lambda s, k: "check::authorize" in s or "telemetry::" in s or "tower_http" in s or "listener::" in s),
 ("axum (routing, per-request boxing, middleware plumbing)", lambda s, k: "axum" in s),
 ("tokio runtime", lambda s, k: "tokio::" in s),
]
samples = collections.Counter(); other = collections.Counter(); total = 0
stack = []
def flush():
    global total
    if not stack: return
    total += 1
    for i, (sym, k) in enumerate(stack):  # leaf first
        if i == 0 and k:
            samples[CATS[0][0]] += 1; return
        s = sym
        if re.match(r"^[a-z_{][\w#{}]*<", s):  # an inlined generic frame (poll<...>, {async_fn#0}<...>): its name only
            s = s[: s.index("<")]
        for name, f in CATS[1:]:
            if f(s, k):
                samples[name] += 1; return
    for sym, k in stack:
        if "0xffff" not in sym and "[unknown]" not in sym:
            other[sym[:60]] += 1; break
    samples["other (allocator, memcpy, libc)"] += 1
src = sys.stdin if sys.argv[1] == "-" else open(sys.argv[1], errors="replace")
for line in src:
    line = line.rstrip("\n")
    if not line.strip():
        flush(); stack = []; continue
    if line[0] not in " \t":
        continue
    m = re.match(r"\s+[0-9a-f]+\s+(.*)\s+\((.*)\)$", line)
    if m:
        stack.append((m.group(1), "kernel" in m.group(2) or m.group(2).startswith("[kernel")))
flush()
us = float(sys.argv[2]) if len(sys.argv) > 2 else None
for k, v in samples.most_common():
    print(f"{k:80s} {v/total*100:5.1f} %" + (f"  {v/total*us:5.1f} µs" if us else ""))
print("samples", total)
