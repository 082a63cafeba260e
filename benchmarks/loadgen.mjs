// Load generator for benchmarks/run.py. One Node process (pinned to its own core by the
// caller), event-driven, so it is not the bottleneck; run.py reports its CPU to prove it.
//
//   node loadgen.mjs '{"scenario":"relay","target":"ours",...}'
// prints one JSON line of results on stdout.
import WebSocket from "ws";

import { readFileSync } from "fs";

// the config: JSON, or "@path" of a file holding it (a long room list exceeds argv's limit)
const arg = process.argv[2];
const cfg = JSON.parse(arg.startsWith("@") ? readFileSync(arg.slice(1), "utf8") : arg);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms
const pad = "x".repeat(cfg.pad ?? 64);

function open(url) {
  // The first frame is awaited from construction on: a server may greet before "open"
  // handlers of ours would attach a listener (PeerJS does).
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: cfg.deflate ?? false });
    ws.first = new Promise((res) => ws.once("message", (d) => res(JSON.parse(d.toString()))));
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

function nextMessage(ws) {
  if (ws.first) { const f = ws.first; ws.first = null; return f; }
  return new Promise((resolve) => ws.once("message", (d) => resolve(JSON.parse(d.toString()))));
}

// ---------------------------------------------------------------- per-target protocol
const targets = {
  ours: {
    async connect(id, meta, where) {
      // `where` (cluster benchmarks): {url, room_id, token} of this peer's instance and room
      const ws = await open(where?.url ?? cfg.ws_url);
      ws.send(JSON.stringify({ type: "register", peer_id: id, room_id: where?.room_id ?? cfg.room_id, token: where?.token ?? cfg.token,
                               id_token: where?.id_token ?? cfg.id_token, role: meta?.role ?? "peer", metadata: meta?.metadata ?? {} }));
      const reply = await nextMessage(ws);
      if (reply.type !== "registered_auth") throw new Error(JSON.stringify(reply));
      return ws;
    },
    send(ws, from, to, payload) { ws.send(JSON.stringify({ type: "peer_message", to_peer_id: to, payload })); },
    parse(data) { const m = JSON.parse(data.toString()); return m.type === "peer_message" ? { from: m.from_peer_id, payload: m.payload } : null; },
  },
  bare: {
    async connect(id) {
      const ws = await open(cfg.ws_url);
      ws.send(id);
      const reply = await nextMessage(ws);  // {"ok":true}
      return ws;
    },
    send(ws, from, to, payload) { ws.send(to + "|" + JSON.stringify({ from, payload })); },
    parse(data) { const m = JSON.parse(data.toString()); return { from: m.from, payload: m.payload }; },
  },
  peerjs: {
    async connect(id) {
      const ws = await open(`${cfg.ws_url}peerjs?key=peerjs&id=${id}&token=t${id}`);
      const reply = await nextMessage(ws);  // {"type":"OPEN"}
      if (reply.type !== "OPEN") throw new Error(JSON.stringify(reply));
      return ws;
    },
    send(ws, from, to, payload) { ws.send(JSON.stringify({ type: "OFFER", dst: to, payload })); },
    parse(data) { const m = JSON.parse(data.toString()); return m.type === "OFFER" ? { from: m.src, payload: m.payload } : null; },
  },
};
targets.old = targets.ours;  // the upstream v2 server (benchmarks/old_v2.py) speaks the same v2
const T = targets[cfg.target];

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function connectMany(n, prefix, metaFn, concurrency = 200, whereFn = undefined) {
  const out = new Array(n);
  let i = 0;
  async function worker() {
    while (i < n) {
      const k = i++;
      out[k] = await T.connect(`${prefix}${k}`, metaFn ? metaFn(k) : undefined, whereFn ? whereFn(k) : undefined);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return out;
}

// After the warm-up, announce the window to run.py, count for cfg.duration, then stop.
async function measureWindow(set) {
  await new Promise((r) => setTimeout(r, (cfg.warmup ?? 0.5) * 1000));
  process.stdout.write(JSON.stringify({ phase: "measure" }) + "\n");
  set(true);
  await new Promise((r) => setTimeout(r, cfg.duration * 1000));
  set(false);
}

// ---------------------------------------------------------------- scenarios
async function relay() {
  const P = cfg.pairs, W = cfg.inflight;
  // cluster benchmarks: side a on ws_url, side b on ws_url_b; pair i in rooms[i % n]
  const where = (url) => cfg.rooms ? (k) => ({ url, ...cfg.rooms[k % cfg.rooms.length] }) : undefined;
  const a = await connectMany(P, `a${cfg.tag ?? ""}-`, undefined, 200, where(cfg.ws_url));
  const b = await connectMany(P, `b${cfg.tag ?? ""}-`, undefined, 200, where(cfg.ws_url_b ?? cfg.ws_url));
  let delivered = 0, measuring = false;
  const rtts = [];
  for (let i = 0; i < P; i++) {
    const aid = `a${cfg.tag ?? ""}-${i}`, bid = `b${cfg.tag ?? ""}-${i}`;
    b[i].on("message", (d) => {  // echo back
      const m = T.parse(d); if (!m) return;
      if (measuring) delivered++;
      T.send(b[i], bid, aid, m.payload);
    });
    a[i].on("message", (d) => {
      const m = T.parse(d); if (!m) return;
      if (measuring) { delivered++; rtts.push(now() - m.payload.t); }
      if (!stopping) T.send(a[i], aid, bid, { t: now(), p: pad });
    });
  }
  let stopping = false;
  for (let i = 0; i < P; i++) for (let w = 0; w < W; w++) T.send(a[i], `a-${i}`, `b${cfg.tag ?? ""}-${i}`, { t: now(), p: pad });
  await new Promise((r) => setTimeout(r, (cfg.warmup ?? 1) * 1000));
  process.stdout.write(JSON.stringify({ phase: "measure" }) + "\n");
  measuring = true;
  const t0 = now();
  await new Promise((r) => setTimeout(r, cfg.duration * 1000));
  measuring = false;
  const secs = (now() - t0) / 1000;
  stopping = true;
  rtts.sort((x, y) => x - y);
  const res = { delivered, msgs_per_s: delivered / secs, rtt_p50_ms: percentile(rtts, 50), rtt_p99_ms: percentile(rtts, 99), samples: rtts.length, seconds: secs };
  for (const ws of [...a, ...b]) ws.terminate();
  return res;
}

async function capacity() {
  const meta = (k) => ({ role: k % 4 ? "client" : "worker", metadata: { tags: ["sleap-rtc"], properties: { gpu_memory_mb: 8192 + (k % 8) * 2048, status: "available", slot: k % 100 } } });
  const t0 = now();
  // connect benchmark: cfg.rooms = [{room_id, token}], peer k joins rooms[k % n]
  const where = cfg.rooms ? (k) => ({ url: cfg.ws_url, ...cfg.rooms[k % cfg.rooms.length] }) : undefined;
  const peers = await connectMany(cfg.count, `idle${cfg.tag ?? ""}-`, meta, cfg.concurrency ?? 200, where);
  const secs = (now() - t0) / 1000;
  process.stdout.write(JSON.stringify({ phase: "connected", count: peers.length, seconds: secs }) + "\n");
  // hold them idle until told to stop (run.py measures RSS meanwhile); optionally probe RTT
  let probe = null;
  if (cfg.probe) {
    const pa = await T.connect(`probe-a${cfg.tag ?? ""}`), pb = await T.connect(`probe-b${cfg.tag ?? ""}`);
    const rtts = [];
    pb.on("message", (d) => { const m = T.parse(d); if (m) T.send(pb, "pb", `probe-a${cfg.tag ?? ""}`, m.payload); });
    await new Promise((resolve) => {
      let n = 0;
      pa.on("message", (d) => {
        const m = T.parse(d); if (!m) return;
        rtts.push(now() - m.payload.t);
        if (++n >= cfg.probe) return resolve();
        T.send(pa, "pa", `probe-b${cfg.tag ?? ""}`, { t: now() });
      });
      T.send(pa, "pa", `probe-b${cfg.tag ?? ""}`, { t: now() });
    });
    rtts.sort((x, y) => x - y);
    probe = { rtt_p50_ms: percentile(rtts, 50), rtt_p99_ms: percentile(rtts, 99), samples: rtts.length };
  }
  process.stdout.write(JSON.stringify({ phase: "idle", probe }) + "\n");
  await new Promise((resolve) => process.stdin.once("data", resolve));
  for (const ws of peers) ws.terminate();
  return { count: peers.length, connect_seconds: secs, probe };
}

async function discover() {
  const clients = await connectMany(cfg.clients, `asker${cfg.tag ?? ""}-`, () => ({ role: "asker" }));
  let requests = 0, measuring = false, stop = false, matched = 0;
  const lat = [];
  await Promise.all(clients.map((ws) => new Promise((resolve) => {
    let t = 0;
    const ask = () => { t = now(); ws.send(JSON.stringify({ type: "discover_peers", filters: cfg.filter })); };
    ws.on("message", (d) => {
      const m = JSON.parse(d.toString());
      if (m.type !== "peer_list") throw new Error(JSON.stringify(m).slice(0, 300));
      matched = m.count;
      if (measuring) { requests++; lat.push(now() - t); }
      if (stop) return resolve();
      ask();
    });
    ask();
  }).catch(() => {})) .concat([measureWindow((on) => { measuring = on; if (!on) stop = true; })]));
  lat.sort((x, y) => x - y);
  for (const ws of clients) ws.terminate();
  return { requests, per_s: requests / cfg.duration, matched, lat_p50_ms: percentile(lat, 50) };
}

async function presence() {
  // S subscribers watch the room's workers; U workers flip their status as fast as the
  // server confirms; every confirmed update is one event per subscriber.
  const subs = await connectMany(cfg.subscribers, `watch${cfg.tag ?? ""}-`, () => ({ role: "client" }));
  let events = 0, measuring = false, stop = false;
  const lag = [];
  await Promise.all(subs.map((ws) => new Promise((resolve) => {
    ws.on("message", (d) => {
      const m = JSON.parse(d.toString());
      if (m.type === "subscribed") return resolve();
      if (measuring && m.type.startsWith("peer_")) {
        events++;
        const t = m.peer?.metadata?.properties?.t;
        if (t) lag.push(now() - t);
      }
    });
    ws.send(JSON.stringify({ type: "subscribe", filters: { role: "worker" } }));
  })));
  const workers = await connectMany(cfg.updaters, `busy${cfg.tag ?? ""}-`, () => ({ role: "worker" }));
  await Promise.all(workers.map((ws) => new Promise((resolve) => {
    let k = 0;
    const upd = () => ws.send(JSON.stringify({ type: "update_metadata", metadata: { properties: { status: (k++ % 2) ? "busy" : "available", t: now() } } }));
    ws.on("message", () => { if (stop) return resolve(); upd(); });
    upd();
  })).concat([measureWindow((on) => { measuring = on; if (!on) stop = true; })]));
  lag.sort((x, y) => x - y);
  for (const ws of [...subs, ...workers]) ws.terminate();
  return { events, events_per_s: events / cfg.duration, lag_p50_ms: percentile(lag, 50), lag_p99_ms: percentile(lag, 99) };
}

const scenarios = { relay, capacity, discover, presence };
scenarios[cfg.scenario]().then((res) => {
  process.stdout.write(JSON.stringify({ phase: "done", result: res }) + "\n");
  process.exit(0);
}, (err) => {
  process.stderr.write(String(err.stack || err) + "\n");
  process.exit(1);
});
