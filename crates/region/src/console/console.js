// The region console: tables over the JSON API, refreshed every 2.5 s
// while anything is in a transitional state (as Horizon does), else every
// 10 s. The credential lives in an HttpOnly cookie set by /login.
"use strict";
const $ = (id) => document.getElementById(id);
const TRANSITIONAL = new Set(["pending", "stopping", "shutting-down", "creating", "deleting", "attaching", "detaching"]);
let who = null;
let timer = null;

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function button(td, label, fn) {
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = label;
  b.onclick = async () => {
    try { showError(null); await fn(); } catch (e) { showError(e); }
    refresh();
  };
  td.appendChild(b);
}

function age(created) {
  const s = Math.max(0, Math.floor(Date.now() / 1000) - created);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  return Math.floor(s / 3600) + "h";
}

function gib(b) { return (b / (1 << 30)).toFixed(2) + " GiB"; }

async function showConsole(id, name) {
  const c = await api("GET", "/v1/instances/" + id + "/console");
  $("console-of").textContent = name;
  $("console-output").textContent = c.output;
  $("console-section").classList.remove("hidden");
}

// One live viewer per attached vGPU the caller may see: frames come
// through the region (which checks ownership and holds the vGPU's
// credential), never from the GPU server straight to the browser.
const viewers = new Map();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function startViewer(v) {
  const fig = document.createElement("figure");
  fig.className = "vgpu-viewer";
  fig.dataset.vgpu = v.id;
  fig.dataset.instance = v.instance;
  const img = document.createElement("img");
  img.alt = "vGPU " + v.id + " output";
  const cap = document.createElement("figcaption");
  cap.innerHTML = '<b class="label"></b>: <span class="fps">0.0</span> fps, <span class="frames">0</span> frames <span class="size"></span> <span class="status">waiting for frames</span>';
  cap.querySelector(".label").textContent = v.instance + " / " + v.id;
  fig.append(img, cap);
  $("viewers").appendChild(fig);
  const st = { stop: false, seq: 0, frames: 0, winStart: performance.now(), winFrames: 0, fig };
  (async () => {
    while (!st.stop) {
      try {
        const r = await fetch("/v1/vgpus/" + v.id + "/frame?after=" + st.seq, { credentials: "same-origin" });
        if (r.status === 204) continue;
        if (!r.ok) {
          cap.querySelector(".status").textContent = "(" + r.status + ")";
          await sleep(1000);
          continue;
        }
        st.seq = Number(r.headers.get("x-frame-seq")) || st.seq;
        cap.querySelector(".size").textContent = r.headers.get("x-frame-size") || "";
        const url = URL.createObjectURL(await r.blob());
        const old = img.src;
        await new Promise((ok) => { img.onload = ok; img.onerror = ok; img.src = url; });
        if (old) URL.revokeObjectURL(old);
        st.frames++;
        st.winFrames++;
        const now = performance.now();
        if (now - st.winStart >= 1000) {
          cap.querySelector(".fps").textContent = ((st.winFrames * 1000) / (now - st.winStart)).toFixed(1);
          st.winStart = now;
          st.winFrames = 0;
        }
        cap.querySelector(".frames").textContent = st.frames;
        cap.querySelector(".status").textContent = "";
        fig.dataset.frames = st.frames;
      } catch (e) {
        cap.querySelector(".status").textContent = "(" + (e.message || e) + ")";
        await sleep(1000);
      }
    }
  })();
  viewers.set(v.id, st);
}

function syncViewers(vgpus) {
  const live = new Set(vgpus.filter((v) => v.state === "attached").map((v) => v.id));
  for (const [id, st] of viewers) {
    if (!live.has(id)) { st.stop = true; st.fig.remove(); viewers.delete(id); }
  }
  for (const v of vgpus) if (live.has(v.id) && !viewers.has(v.id)) startViewer(v);
}

async function refresh() {
  clearTimeout(timer);
  let busy = false;
  try {
    const [instances, volumes, vgpus] = await Promise.all([api("GET", "/v1/instances"), api("GET", "/v1/volumes"), api("GET", "/v1/vgpus")]);
    const gb = $("vgpus").querySelector("tbody");
    gb.replaceChildren();
    for (const v of vgpus) {
      const tr = document.createElement("tr");
      tr.dataset.vgpu = v.id;
      busy = busy || TRANSITIONAL.has(v.state);
      cell(tr, v.id);
      cell(tr, v.instance);
      cell(tr, v.vgpu_type);
      cell(tr, v.server);
      cell(tr, v.state, "state state-" + v.state);
      cell(tr, v.health, "health-" + v.health);
      gb.appendChild(tr);
    }
    syncViewers(vgpus);
    const running = instances.filter((i) => i.state.name === "running");
    const ib = $("instances").querySelector("tbody");
    ib.replaceChildren();
    for (const i of instances) {
      const tr = document.createElement("tr");
      tr.dataset.name = i.name;
      tr.dataset.state = i.state.name;
      busy = busy || TRANSITIONAL.has(i.state.name);
      cell(tr, i.name);
      cell(tr, i.id);
      cell(tr, i.state.name + " (" + i.state.code + ")", "state state-" + i.state.name);
      cell(tr, i.health, "health-" + i.health);
      cell(tr, i.host);
      cell(tr, i.instance_type);
      cell(tr, i.volumes.map((v) => v.name + (v.attachment ? " [" + v.attachment + "]" : "")).join(", "));
      cell(tr, age(i.created));
      const td = cell(tr, "");
      const act = (a) => () => api("POST", "/v1/instances/" + i.id + "/" + a);
      if (i.state.name === "running") { button(td, "stop", act("stop")); button(td, "reboot", act("reboot")); }
      if (i.state.name === "stopped") button(td, "start", act("start"));
      if (i.state.name !== "terminated" && i.state.name !== "shutting-down") button(td, "terminate", act("terminate"));
      button(td, "console", () => showConsole(i.id, i.name));
      ib.appendChild(tr);
    }
    const vb = $("volumes").querySelector("tbody");
    vb.replaceChildren();
    for (const v of volumes) {
      const tr = document.createElement("tr");
      tr.dataset.name = v.name;
      tr.dataset.state = v.state;
      const att = v.attachment;
      busy = busy || TRANSITIONAL.has(v.state) || (att && TRANSITIONAL.has(att.state));
      cell(tr, v.name);
      cell(tr, v.id);
      cell(tr, v.state, "state state-" + v.state);
      cell(tr, gib(v.size_bytes));
      cell(tr, v.host + "/" + v.device);
      cell(tr, att ? att.instance + " (" + att.state + ")" : "", att ? "state-" + att.state : "");
      const td = cell(tr, "");
      if (v.state === "available" && !v.boot_of) {
        const sel = document.createElement("select");
        sel.className = "attach-to";
        for (const i of running.filter((i) => i.host === v.host)) {
          const o = document.createElement("option");
          o.value = i.id;
          o.textContent = i.name;
          sel.appendChild(o);
        }
        td.appendChild(sel);
        button(td, "attach", () => api("POST", "/v1/volumes/" + v.id + "/attach", { instance: sel.value }));
        button(td, "delete", () => api("DELETE", "/v1/volumes/" + v.id));
      }
      if (att && (att.state === "attached" || att.state === "busy") && !v.boot_of) {
        button(td, "detach", () => api("POST", "/v1/volumes/" + v.id + "/detach", { force: att.state === "busy" }));
      }
      vb.appendChild(tr);
    }
    if (who && who.kind === "admin") {
      const hosts = await api("GET", "/v1/hosts");
      const hb = $("hosts").querySelector("tbody");
      hb.replaceChildren();
      for (const h of hosts) {
        const tr = document.createElement("tr");
        cell(tr, h.name);
        const seen = h.last_seen ? " (last seen " + new Date(h.last_seen * 1000).toISOString() + ")" : "";
        cell(tr, h.state + seen, "state-" + h.state);
        cell(tr, h.vcpus_used + "/" + h.vcpus);
        cell(tr, h.memory_mib_used + "/" + h.memory_mib);
        cell(tr, h.devices.map((d) => d.name + " " + gib(d.used_bytes) + "/" + gib(d.capacity_bytes)).join(", "));
        hb.appendChild(tr);
      }
    }
  } catch (e) {
    showError(e);
  }
  timer = setTimeout(refresh, busy ? 2500 : 10000);
}

async function start() {
  who = await api("GET", "/v1/whoami");
  $("who").textContent = who.kind + (who.name ? " " + who.name : "");
  $("login").classList.add("hidden");
  $("main").classList.remove("hidden");
  const tenant = who.kind === "tenant";
  for (const f of document.querySelectorAll(".tenant-only")) f.classList.toggle("hidden", !tenant);
  $("hosts-section").classList.toggle("hidden", who.kind !== "admin");
  const [types, images, vtypes] = await Promise.all([api("GET", "/v1/instance-types"), api("GET", "/v1/images"), api("GET", "/v1/vgpu-types")]);
  $("ci-vgpu").replaceChildren(new Option("no vGPU", ""), ...vtypes.map((t) => new Option(t.name + " (" + gib(t.memory_bytes) + ")", t.name)));
  $("ci-type").replaceChildren(...types.map((t) => new Option(t.name + " (" + t.vcpus + " vCPU, " + t.memory_mib + " MiB)", t.name)));
  $("ci-image").replaceChildren(...images.map((i) => new Option(i.name, i.name)));
  refresh();
}

$("login-form").onsubmit = async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/login", { credential: $("credential").value });
    await start();
  } catch (e) {
    showError(e);
    alert("Login failed: " + e.message);
  }
};
$("logout").onclick = async () => { await api("POST", "/logout"); location.reload(); };
$("create-instance").onsubmit = async (ev) => {
  ev.preventDefault();
  try {
    showError(null);
    const body = { name: $("ci-name").value, type: $("ci-type").value, image: $("ci-image").value, volume_size: $("ci-size").value };
    if ($("ci-vgpu").value) body.vgpu = $("ci-vgpu").value;
    await api("POST", "/v1/instances", body);
  } catch (e) { showError(e); }
  refresh();
};
$("create-volume").onsubmit = async (ev) => {
  ev.preventDefault();
  try {
    showError(null);
    const body = { name: $("cv-name").value, size: $("cv-size").value };
    if ($("cv-near").value) body.near = $("cv-near").value;
    await api("POST", "/v1/volumes", body);
  } catch (e) { showError(e); }
  refresh();
};
// Already logged in (cookie): go straight to the tables.
api("GET", "/v1/whoami").then(start, () => {});
