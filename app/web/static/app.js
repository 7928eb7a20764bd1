// kvm-memattr memory map: draws one VM's gfn space from the JSON API. No framework, no CDN.
"use strict";

// The service default host's max_gfn; a selected VM's own profile replaces it (state.maxGfn).
const MAX_GFN = BigInt(document.body.dataset.maxGfn);
const GFN_LIMIT = 1n << 52n;
const LABEL_W = 130;
const LANE_H = 26;
const PROTOCOL = new Set(["invalidate_begin", "invalidate_range_add", "unmap", "tlb_flush",
  "attributes_store", "invalidate_end", "attributes_rollback", "attributes_store_failed"]);
const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem("kvm-memattr-token") || "",
  vm: null,
  start: 0n,
  end: MAX_GFN + 1n,
  maxGfn: MAX_GFN,
  lastEvent: 0,
  traceSince: 0,  // events up to here were there when the VM was opened: not highlighted
  stream: null,
  poll: null,
  drawn: 0,
  hostMappings: [],  // the VM's host mappings, as GET .../host-mappings answered at the last refresh
  hostPins: [],  // and its pins of file pages (GET .../host-pins)
};

// ------------------------------------------------------------------ the API

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token) headers["Authorization"] = `Bearer ${state.token}`;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 204) return null;
  const data = await r.json();
  if (!r.ok) {
    if (r.status === 401 || r.status === 403) $("#token-form").hidden = false;
    const err = new Error(data.detail || r.statusText);
    err.errno = data.errno || String(r.status);
    err.signal = data.signal;  // a host access: the signal it took (SIGBUS, SIGSEGV)
    err.errorOffset = data.error_offset;  // KVM_SET_MEMORY_ATTRIBUTES2's EAGAIN and ENOMEM
    err.status = r.status;
    throw err;
  }
  return data;
}

function showError(err) {
  const box = $("#error");
  box.hidden = false;
  box.replaceChildren();
  const b = document.createElement("b");
  b.textContent = [err.errno || "error", err.signal].filter(Boolean).join(" ");
  const at = err.errorOffset === undefined || err.errorOffset === null ? "" : ` (error_offset ${hex(err.errorOffset)})`;
  box.append(b, ` (HTTP ${err.status || "?"}): ${err.message}${at}`);
}

function clearError() { $("#error").hidden = true; }

async function act(fn) {
  clearError();
  try {
    const result = await fn();
    if (result !== undefined) $("#last-result").textContent = summarize(result);
  } catch (err) {
    $("#last-result").textContent = "";  // the previous call's result is not this one's
    showError(err);
  }
  if (state.vm) await refresh();
}

function summarize(result) {
  if (!result || typeof result !== "object") return String(result);
  const keep = ["change", "outcome", "retry_reason", "noop", "invalidated", "pages_zapped", "tlb_flushed",
    "mapped_pages", "already_mapped_pages", "stopped", "id", "fail_nth", "fd", "released", "pages_allocated",
    "pages_freed", "pages", "allocated_pages"];
  const parts = keep.filter((k) => k in result).map((k) => `${k}=${JSON.stringify(result[k])}`);
  const exit = result.exit;
  if (exit && exit.reason === "KVM_EXIT_MMIO") parts.push(`exit=mmio gpa=${hex(exit.gpa)} ${exit.is_write ? "write" : "read"}`);
  else if (exit) parts.push(`exit=${exit.reason}(${exit.reason_code}) flags=${exit.flags}`);
  return parts.join("  ");
}

const num = (text) => BigInt(String(text).trim());
// One base per meaning, as in the CLI: addresses, gfns, sizes, offsets and slot ids in hex, counts in decimal.
const HEX_KEY = new RegExp(document.body.dataset.hexKeys);  // the CLI's rule (app/models/names.py)
const hex = (n) => "0x" + BigInt(n).toString(16);
const bigMin = (a, b) => (a < b ? a : b);
const bigMax = (a, b) => (a > b ? a : b);
const PAGE_SHIFT = 12n;
const pages = (bytes) => BigInt(bytes) >> PAGE_SHIFT;
// Byte offsets [start, end) of a file as its pages.
const filePages = (start, end) => `[${hex(pages(start))}, ${hex(pages(end))})`;
const GMEM_FLAGS = [[1, "MMAP"], [2, "INIT_SHARED"]];  // GUEST_MEMFD_FLAG_*
const KVM_MEM_GUEST_MEMFD = 4;

const vmPath = (tail) => `/v1/vms/${state.vm.id}${tail}`;

// ------------------------------------------------------------------ VMs

async function loadVms() {
  const { vms } = await api("GET", "/v1/vms");
  const list = $("#vms");
  list.replaceChildren();
  for (const vm of vms) {
    const li = document.createElement("li");
    li.dataset.id = vm.id;
    li.className = state.vm && state.vm.id === vm.id ? "selected" : "";
    const label = document.createElement("span");
    const who = vm.name ? `${vm.name} (${vm.id.slice(0, 8)})` : vm.id.slice(0, 8);
    label.textContent = `${who} · ${vm.type} · ${vm.semantics} · ${vm.profile}`;
    label.title = `behaves as host profile ${vm.profile} (kernel ${vm.kernel})`;
    const del = document.createElement("button");
    del.textContent = "delete";
    del.title = "destroy this VM";
    del.addEventListener("click", (e) => { e.stopPropagation(); act(() => deleteVm(vm.id)); });
    li.append(label, del);
    li.addEventListener("click", () => selectVm(vm.id));
    list.append(li);
  }
  return vms;
}

async function deleteVm(id) {
  await api("DELETE", `/v1/vms/${id}`);
  if (state.vm && state.vm.id === id) {
    state.vm = null;
    stopTrace();
    $("#vm-view").hidden = true;
    $("#mmu-panel").hidden = true;
  }
  await loadVms();
}

async function selectVm(id) {
  clearError();
  state.vm = await api("GET", `/v1/vms/${id}`);
  const caps = await api("GET", `/v1/vms/${id}/capabilities`);
  state.maxGfn = BigInt(caps.max_gfn);
  state.inPlace = caps.caps.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES !== 0;
  [state.start, state.end] = await fittedWindow();
  state.lastEvent = 0;
  $("#events").replaceChildren();
  $("#vm-view").hidden = false;
  $("#mmu-panel").hidden = false;
  $("#vm-title").textContent = `${state.vm.name || state.vm.id} (${state.vm.type}, ${state.vm.semantics}, host ${state.vm.profile})`;
  $("#convert-api").textContent = state.inPlace ? "KVM_SET_MEMORY_ATTRIBUTES2 on the slot's guest_memfd"
    : state.vm.semantics === "linux" ? "KVM_SET_MEMORY_ATTRIBUTES" : "KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION";
  await loadVms();
  await refresh();
  await startTrace();
}

async function refresh() {
  if (!state.vm) return;
  try {
    state.vm = await api("GET", `/v1/vms/${state.vm.id}`);
  } catch (err) {
    showError(err);
    return;
  }
  drawMmu(state.vm.mmu);
  await Promise.all([drawGmem().then(drawMap), drawNotifiers()]);
}

function drawMmu(mmu) {
  const rows = [
    ["mmu_invalidate_seq", mmu.mmu_invalidate_seq],
    ["in_progress", mmu.mmu_invalidate_in_progress],
    ["range", mmu.mmu_invalidate_range_start === null ? "INVALID_GPA" :
      `[${hex(mmu.mmu_invalidate_range_start)}, ${hex(mmu.mmu_invalidate_range_end)})`],
    ["mapped pages", mmu.mapped_pages],
    ["open notifiers", mmu.open_notifier_invalidations],
    ...Object.entries(mmu.stats),
  ];
  const table = $("#mmu");
  table.replaceChildren();
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.dataset.key = k;
    // A kernel name breaks only after an underscore (was: "mmu_invalida te_seq" in a narrow panel).
    tr.insertCell().textContent = k.replaceAll("_", "_\u200b");
    tr.insertCell().textContent = String(v);
  }
}

// ------------------------------------------------------------------ the map

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.append(node);
  return node;
}

function plotWidth() { return Math.max(200, $("#map").clientWidth - LABEL_W - 10); }

function xOf(gfn) {
  const span = Number(state.end - state.start);
  return LABEL_W + (Number(BigInt(gfn) - state.start) / span) * plotWidth();
}

function gfnAt(x) {
  const span = state.end - state.start;
  const frac = Math.min(Math.max((x - LABEL_W) / plotWidth(), 0), 0.999999);
  return state.start + BigInt(Math.floor(frac * Number(span)));
}

async function drawMap() {
  const vm = state.vm;
  const buckets = Math.min(4096, Math.max(1, Math.floor(plotWidth() / 2)));
  const q = `start_gfn=${hex(state.start)}&end_gfn=${hex(state.end)}&buckets=${buckets}`;
  const map = await api("GET", `/v1/vms/${vm.id}/memory-map?${q}`);
  const span = state.end - state.start;
  const detail = span <= 4096n;
  const runs = detail ? await Promise.all([...Array(vm.address_spaces).keys()].map((as) =>
    api("GET", `/v1/vms/${vm.id}/mappings?as_id=${as}&${q.split("&buckets")[0]}&limit=10000`))) : null;

  const svg = $("#map");
  [...svg.children].forEach((c) => { if (c.tagName !== "defs") c.remove(); });
  // Under the memslots, a lane of guest_memfd pages for each address space with a slot bound to a file here.
  const bound = map.memslots.filter((s) => s.guest_memfd !== null);
  const gmemAs = [...new Set(bound.map((s) => s.as_id))].sort();
  const addressSpaces = [...Array(vm.address_spaces).keys()];
  const lanes = ["attributes", "memslots", ...gmemAs.map((a) => `gmem pages as${a}`),
    ...addressSpaces.map((a) => `mappings as${a}`)];
  const laneY = (i) => 10 + i * (LANE_H + 6);
  const row = (name) => laneY(lanes.indexOf(name));
  const gmemRow = (as) => row(`gmem pages as${as}`);
  const height = lanes.length * (LANE_H + 6) + 34;
  svg.setAttribute("height", height);
  const g = el("g", {}, svg);
  lanes.forEach((name, i) => {
    const t = el("text", { x: 4, y: 10 + i * (LANE_H + 6) + LANE_H / 2 + 4 }, g);
    t.textContent = name;
  });
  const clip = (a, b) => [bigMax(BigInt(a), state.start), bigMin(BigInt(b), state.end)];

  for (const s of bound) {  // where the file is bound: the lane's background
    const [a, b] = clip(s.base_gfn, BigInt(s.base_gfn) + BigInt(s.npages));
    el("rect", { x: xOf(a), y: gmemRow(s.as_id), width: Math.max(xOf(b) - xOf(a), 1), height: LANE_H,
      class: "filebound" }, g);
  }
  el("rect", { x: xOf(state.start), y: laneY(0), width: plotWidth(), height: LANE_H, class: "shared" }, g);
  // A bucket's count is a bar rising from its lane's floor; neighbouring buckets of one height are
  // one rect (no seams between them, and fewer nodes).
  const bars = new Map();  // lane y -> { attrs, list of [x0, x1, h] }
  const bar = (y, attrs, b, count) => {
    if (count <= 0) return;
    const [x0, x1] = [xOf(b.start_gfn), xOf(b.end_gfn)];
    const h = Math.max(LANE_H * (count / (b.end_gfn - b.start_gfn)), 2);
    if (!bars.has(y)) bars.set(y, { attrs, list: [] });
    const list = bars.get(y).list;
    const last = list[list.length - 1];
    if (last && last[2] === h && Math.abs(last[1] - x0) < 1e-6) last[1] = x1;
    else list.push([x0, x1, h]);
  };
  for (const b of map.buckets) {
    bar(laneY(0), { fill: "url(#pat-private)" }, b, b.private_pages);
    for (const as of gmemAs) bar(gmemRow(as), { class: "filepage" }, b, b.gmem_allocated_pages[as]);
    if (!detail) b.mapped_pages.forEach((m, as) => bar(row(`mappings as${as}`), { class: "mapped" }, b, m));
  }
  for (const [y, { attrs, list }] of bars) {
    for (const [x0, x1, h] of list) el("rect", { x: x0, y: y + LANE_H - h, width: Math.max(x1 - x0, 0.5), height: h, ...attrs }, g);
  }
  for (const s of bound) {  // the host's mappings and pins of the file, at the gfns this slot binds them to
    const pg = pages(s.guest_memfd_offset);
    const toGfn = BigInt(s.base_gfn) - pg;
    const spans = [
      ...state.hostMappings.filter((m) => m.fd === s.guest_memfd)
        .map((m) => [m.offset, m.length, 0, { class: "hostmapped", "data-mapping": m.id }]),
      ...state.hostPins.filter((p) => p.fd === s.guest_memfd)
        .map((p) => [p.offset, p.size, 5, { class: "pinned", "data-pin": p.id }]),
    ];
    for (const [offset, length, dy, attrs] of spans) {
      const lo = bigMax(pages(offset), pg);
      const hi = bigMin(pages(offset) + pages(length), pg + BigInt(s.npages));
      const [a, b] = clip(lo + toGfn, hi + toGfn);
      if (a >= b) continue;
      el("rect", { x: xOf(a), y: gmemRow(s.as_id) + dy, width: Math.max(xOf(b) - xOf(a), 1), height: 4, ...attrs }, g);
    }
  }
  for (const s of map.memslots) {
    const [a, b] = clip(s.base_gfn, BigInt(s.base_gfn) + BigInt(s.npages));
    const gmem = (s.flags & KVM_MEM_GUEST_MEMFD) !== 0;
    const fill = s.gmem_only ? "url(#pat-gmem-only)" : gmem ? "url(#pat-gmem)" : "#8a8f98";
    const r = el("rect", { x: xOf(a), y: laneY(1), width: Math.max(xOf(b) - xOf(a), 1), height: LANE_H,
      fill, "data-slot": s.slot, "data-gmem-only": s.gmem_only ? "1" : "0" }, g);
    r.classList.add("slot-rect");
    const kind = s.gmem_only ? " gmem-only" : gmem ? " gmem" : "";
    const binding = !gmem ? "" : s.guest_memfd === null ? ", no file" :
      `, fd ${s.guest_memfd} pgoff ${hex(pages(s.guest_memfd_offset))}`;
    // The longest label that fits (about 6.5 px a character).
    const label = [`slot ${hex(s.slot)}${kind}${binding}`, `slot ${hex(s.slot)}${kind}`, `slot ${hex(s.slot)}`]
      .find((text) => text.length * 6.5 + 8 < xOf(b) - xOf(a));
    if (label) {  // on a plate, so it reads over the slot's pattern
      const t = el("text", { x: xOf(a) + 6, y: laneY(1) + LANE_H - 9, class: "slot-label" }, g);
      t.textContent = label;
      const box = t.getBBox();
      g.insertBefore(el("rect", { x: box.x - 3, y: box.y - 1, width: box.width + 6, height: box.height + 2, rx: 3,
        class: "label-plate" }), t);
    }
  }
  if (detail) {
    runs.forEach((page, as) => {
      for (const r of page.runs) {
        const x0 = xOf(r.start_gfn);
        el("rect", { x: x0, y: row(`mappings as${as}`), width: Math.max(xOf(r.end_gfn) - x0, 1), height: LANE_H,
          fill: r.private ? "url(#pat-private)" : "#2e9e5b", stroke: r.writable ? "none" : "#1d2330" }, g);
      }
    });
    if (span <= 64n) {  // single pages: draw each boundary and number
      for (let gfn = state.start; gfn <= state.end; gfn++) {
        el("line", { x1: xOf(gfn), x2: xOf(gfn), y1: laneY(0), y2: laneY(lanes.length) - 6, stroke: "#fff" }, g);
      }
    }
  }
  if (map.invalidation) {
    const [a, b] = clip(map.invalidation.start_gfn, map.invalidation.end_gfn);
    el("rect", { x: xOf(a), y: 4, width: Math.max(xOf(b) - xOf(a), 2), height: laneY(lanes.length) - 6,
      class: "inval" }, g);
    const t = el("text", { x: xOf(a) + 2, y: laneY(lanes.length) + 8 }, g);
    t.textContent = `open invalidation [${hex(map.invalidation.start_gfn)}, ${hex(map.invalidation.end_gfn)})`;
  }
  const axis = el("text", { x: LABEL_W, y: height - 4 }, g);
  axis.textContent = `gfn ${hex(state.start)} (gpa ${hex(state.start << 12n)})`;
  const axisEnd = el("text", { x: LABEL_W + plotWidth(), y: height - 4, "text-anchor": "end" }, g);
  axisEnd.textContent = `gfn ${hex(state.end)}`;
  $("#window").textContent = `window [${hex(state.start)}, ${hex(state.end)}): ${span} gfns, ${map.buckets.length} buckets`;
  state.drawn += 1;
  svg.dataset.drawn = String(state.drawn);
  window.kvmMemattrDrawnAt = performance.now();
}

// The window the map opens on: every memslot of the VM (all address spaces) with a margin of an
// eighth on each side; the whole gfn space only when it has none.
async function fittedWindow() {
  const { memslots } = await api("GET", `/v1/vms/${state.vm.id}/memslots`);
  if (!memslots.length) return [0n, state.maxGfn + 1n];
  const start = memslots.reduce((m, s) => (BigInt(s.base_gfn) < m ? BigInt(s.base_gfn) : m), BigInt(memslots[0].base_gfn));
  const end = memslots.reduce((m, s) => {
    const e = BigInt(s.base_gfn) + BigInt(s.npages);
    return e > m ? e : m;
  }, 0n);
  const margin = (end - start) / 8n;
  const lo = start > margin ? start - margin : 0n;
  const hi = end + margin > GFN_LIMIT ? GFN_LIMIT : end + margin;
  return [lo, hi];
}

async function fitView() {
  const [start, end] = await fittedWindow();
  return zoomTo(start, end);
}

function zoomTo(start, end) {
  const min = 8n;
  if (end - start < min) {
    const mid = (start + end) / 2n;
    start = mid - min / 2n;
    end = start + min;
  }
  if (start < 0n) { end -= start; start = 0n; }
  if (end > GFN_LIMIT) { start -= end - GFN_LIMIT; end = GFN_LIMIT; }
  state.start = start < 0n ? 0n : start;
  state.end = end;
  return drawMap().catch(showError);
}

let drag = null;
let hoverTimer = null;

function setupMap() {
  const svg = $("#map");
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const at = gfnAt(e.offsetX);
    const span = state.end - state.start;
    const next = e.deltaY < 0 ? span / 2n : span * 2n;
    const left = BigInt(Math.round(Number(at - state.start) * Number(next) / Number(span)));
    zoomTo(at - left, at - left + next);
  }, { passive: false });
  svg.addEventListener("mousedown", (e) => {
    drag = { x: e.offsetX, rect: el("rect", { x: e.offsetX, y: 0, width: 0, height: svg.clientHeight, class: "selection" }, svg) };
  });
  svg.addEventListener("mousemove", (e) => {
    if (drag) {
      const x = Math.min(drag.x, e.offsetX);
      drag.rect.setAttribute("x", x);
      drag.rect.setAttribute("width", Math.abs(e.offsetX - drag.x));
    }
    hover(e);
  });
  svg.addEventListener("mouseup", (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    d.rect.remove();
    if (Math.abs(e.offsetX - d.x) > 4) {
      const a = gfnAt(Math.min(d.x, e.offsetX));
      const b = gfnAt(Math.max(d.x, e.offsetX)) + 1n;
      zoomTo(a, b);
    }
  });
  svg.addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
  $("#zoom-all").addEventListener("click", () => zoomTo(0n, state.maxGfn + 1n));
  $("#zoom-fit").addEventListener("click", () => fitView().catch(showError));
  $("#zoom-out").addEventListener("click", () => {
    const span = state.end - state.start;
    zoomTo(state.start - span / 2n, state.end + span / 2n);
  });
  $("#jump").addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      const gfn = num(new FormData(e.target).get("gpa")) >> 12n;
      zoomTo(gfn - 16n, gfn + 16n);
    } catch (err) {
      showError({ errno: "EINVAL", status: 0, message: "a gpa is decimal or 0x hex" });
    }
  });
}

function hover(e) {
  if (e.offsetX < LABEL_W || !state.vm) return;
  const gfn = gfnAt(e.offsetX);
  const tip = $("#tooltip");
  tip.hidden = false;
  tip.style.left = `${e.clientX + 14}px`;
  tip.style.top = `${e.clientY + 14}px`;
  tip.textContent = `gfn ${hex(gfn)}  gpa ${hex(gfn << 12n)}`;
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(async () => {
    try {
      const info = await api("GET", `/v1/vms/${state.vm.id}/gfns/${hex(gfn)}`);
      const slots = info.memslots.map((s) => `as${s.as_id} slot ${hex(s.slot)}${s.gmem_only ? " gmem-only" : ""}` +
        (s.guest_memfd === null ? "" : `, fd ${s.guest_memfd} pgoff ${hex(s.gmem_pgoff)} ` +
          (s.gmem_allocated ? "allocated" : "not allocated"))).join("; ") || "none";
      const maps = info.mappings.map((m) => `as${m.as_id} ${m.private ? "private" : "shared"}${m.writable ? " writable" : " read-only"}`).join(", ") || "not mapped";
      tip.textContent = `gfn ${hex(info.gfn)}  gpa ${hex(info.gpa)}\nattributes ${info.attributes} (${info.private ? "private" : "shared"})\nmemslot ${slots}\nmapping ${maps}`;
    } catch (err) { /* the VM may be gone: the tooltip keeps the address */ }
  }, 60);
}

// ------------------------------------------------------------------ the trace

async function startTrace() {
  stopTrace();
  const id = state.vm.id;
  try {  // the id of the newest event now: later ones are highlighted as they arrive
    let page = await api("GET", `/v1/vms/${id}/events?limit=1`);
    while (page.next_after !== null) page = await api("GET", `/v1/vms/${id}/events?after=${page.next_after}&limit=10000`);
    const last = page.events[page.events.length - 1];
    state.traceSince = last ? last.id : 0;
  } catch (err) { state.traceSince = 0; }
  const onEvent = (ev) => {
    if (ev.id <= state.lastEvent) return;
    state.lastEvent = ev.id;
    const li = document.createElement("li");
    li.value = ev.id;
    li.dataset.type = ev.type;
    li.className = (ev.id > state.traceSince ? "new" : "") + (PROTOCOL.has(ev.type) ? " protocol" : "");
    const extra = Object.entries(ev).filter(([k]) => !["id", "time", "type"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "number" && HEX_KEY.test(k) ? hex(v) : JSON.stringify(v)}`).join(" ");
    li.textContent = `${ev.type} ${extra}`;
    const list = $("#events");
    list.append(li);
    while (list.children.length > 300) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
    setTimeout(() => li.classList.remove("new"), 2500);
  };
  const poll = async () => {
    try {
      const page = await api("GET", `/v1/vms/${id}/events?after=${state.lastEvent}&limit=500`);
      page.events.forEach(onEvent);
    } catch (err) { /* polling resumes on the next tick */ }
  };
  // Poll until a person touches the page, then stream: a page nobody uses holds no connection open,
  // so a headless screenshot (chromium --virtual-time-budget) settles.
  $("#trace-mode").textContent = "(polling)";
  state.poll = setInterval(poll, 500);
  poll();
  if (state.token || !window.EventSource) return;  // EventSource cannot send a bearer token
  const upgrade = () => {
    for (const kind of ["pointerdown", "keydown", "wheel"]) document.removeEventListener(kind, upgrade);
    if (state.poll && state.vm && state.vm.id === id) streamTrace(id, onEvent, poll);
  };
  for (const kind of ["pointerdown", "keydown", "wheel"]) document.addEventListener(kind, upgrade, { passive: true });
}

function streamTrace(id, onEvent, poll) {
  clearInterval(state.poll);
  state.poll = null;
  $("#trace-mode").textContent = "(live)";
  const es = new EventSource(`/v1/vms/${id}/events/stream?after=${state.lastEvent}`);
  es.addEventListener("trace", (m) => onEvent(JSON.parse(m.data)));
  es.onerror = () => {
    es.close();
    if (state.stream === es && state.vm && state.vm.id === id) {
      $("#trace-mode").textContent = "(polling)";
      state.poll = setInterval(poll, 500);
    }
  };
  state.stream = es;
}

function stopTrace() {
  if (state.stream) state.stream.close();
  if (state.poll) clearInterval(state.poll);
  state.stream = null;
  state.poll = null;
}

// ------------------------------------------------------------------ actions

// A button that runs one API call as an action.
function button(text, title, call) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", () => act(call));
  return b;
}

async function drawNotifiers() {
  const { invalidations } = await api("GET", vmPath("/mmu-notifier/invalidations"));
  $("#notifiers").replaceChildren(...invalidations.map((inv) => button(`end #${inv.id}`, "invalidate_range_end()",
    () => api("DELETE", vmPath(`/mmu-notifier/invalidations/${inv.id}`)))));
}

// The VM's guest_memfd files and host mappings. Of a file's pages the panel lists the first
// FILE_RUNS runs (GET .../pages answers one entry per run, however large the file) and the count;
// the map draws all of them.
const FILE_RUNS = 16;

// The file page ranges where runs have `key` set: runs split where the other field changes merge.
function spans(runs, key) {
  const out = [];
  for (const r of runs.filter((x) => x[key])) {
    const last = out[out.length - 1];
    if (last && BigInt(last[1]) === BigInt(r.start)) last[1] = r.end;
    else out.push([r.start, r.end]);
  }
  return out.map(([a, b]) => filePages(a, b));
}

async function drawGmem() {
  const [{ guest_memfds: files }, { mappings }, { pins }] = await Promise.all([
    api("GET", vmPath("/guest-memfds")), api("GET", vmPath("/host-mappings")), api("GET", vmPath("/host-pins"))]);
  const runs = await Promise.all(files.map((f) => api("GET", vmPath(`/guest-memfds/${f.fd}/pages?limit=${FILE_RUNS}`))));
  state.hostMappings = mappings;
  state.hostPins = pins;
  $("#gmem-panel").hidden = !files.length && !mappings.length && !pins.length;

  const table = (id, head, rows) => {
    const t = $(id);
    t.replaceChildren();
    const tr = t.insertRow();
    for (const h of head) {
      const th = document.createElement("th");
      th.textContent = h;
      tr.append(th);
    }
    for (const [key, cells] of rows) {
      const r = t.insertRow();
      r.dataset.key = key;
      for (const c of cells) r.insertCell().append(c);
    }
  };
  table("#gmem-files", ["fd", "size", "flags", "allocated pages", "bound to (slot: file pages)", "allocated (file pages)",
    "private (file pages)", "host mappings", ""], files.map((f, i) => {
    const flags = GMEM_FLAGS.filter(([bit]) => f.flags & bit).map(([, name]) => name).join(" | ") || "0";
    const bindings = f.bindings.map((b) => `slot ${hex(b.slot)}: ${filePages(b.offset, BigInt(b.offset) + BigInt(b.size))}`);
    const allocated = spans(runs[i].runs, "allocated");
    const priv = spans(runs[i].runs, "private");
    if (runs[i].next_offset !== null) allocated.push("…");
    if (runs[i].next_offset !== null) priv.push("…");
    return [f.fd, [String(f.fd), hex(f.size), flags, String(f.allocated_pages), bindings.join(", ") || "none",
      allocated.join(" ") || "none", priv.join(" ") || "none", f.mappings.map((m) => `#${m}`).join(" ") || "none",
      button("close", `close(${f.fd}): kvm_gmem_release() at the last reference`, () => api("DELETE", vmPath(`/guest-memfds/${f.fd}`)))]];
  }));
  table("#host-mappings", ["host mapping", "fd", "file pages", "pages", ""], mappings.map((m) => [m.id, [
    `#${m.id}`, m.fd === null ? "closed" : String(m.fd),
    filePages(m.offset, BigInt(m.offset) + BigInt(m.length)), String(pages(m.length)),
    button("munmap", `munmap() mapping #${m.id}`, () => api("DELETE", vmPath(`/host-mappings/${m.id}`)))]]));
  table("#host-pins", ["pin", "fd", "file pages", ""], pins.map((p) => [p.id, [
    `#${p.id}`, p.fd === null ? "closed" : String(p.fd), filePages(p.offset, BigInt(p.offset) + BigInt(p.size)),
    button("unpin", `unpin_user_pages(): drop pin #${p.id}`, () => api("DELETE", vmPath(`/host-pins/${p.id}`)))]]));
  $("#gmem-files").hidden = !files.length;
  $("#host-mappings").hidden = !mappings.length;
  $("#host-pins").hidden = !pins.length;
}

function form(id, handler) {
  $(id).addEventListener("submit", (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(e.target));
    act(() => handler(data, e.target));
  });
}

function setupActions() {
  form("#create-vm", async (d) => {
    const body = { type: d.type, semantics: d.semantics, name: d.name || null, profile: d.profile || null };
    const vm = await api("POST", "/v1/vms", body);
    await selectVm(vm.id);
    return vm;
  });
  form("#add-slot", async (d) => {
    const body = { guest_phys_addr: d.gpa, memory_size: d.size, userspace_addr: d.hva };
    if (d.gmem) {
      const flags = GMEM_FLAGS.reduce((acc, [bit, name]) => (d[name] ? acc | bit : acc), 0);
      const f = await api("POST", vmPath("/guest-memfds"), { size: d.size, flags });
      Object.assign(body, { flags: KVM_MEM_GUEST_MEMFD, guest_memfd: f.fd });
    }
    return api("PUT", vmPath(`/memslots/${d.slot}`), body);
  });
  form("#convert", async (d) => {
    const attributes = d.to === "private" ? 8 : 0;
    if (state.inPlace) {
      // What a VMM does in place (QEMU's kvm_convert_memory()): the gpa's slot names the file and offset.
      const gpa = BigInt(d.gpa);
      const { memslots } = await api("GET", vmPath("/memslots"));
      const s = memslots.find((m) => m.as_id === 0 && BigInt(m.guest_phys_addr) <= gpa
        && gpa < BigInt(m.guest_phys_addr) + BigInt(m.memory_size));
      if (!s || s.guest_memfd === null) throw new Error(`no guest_memfd slot holds gpa ${d.gpa}`);
      const offset = BigInt(s.guest_memfd_offset) + gpa - BigInt(s.guest_phys_addr);
      return api("POST", vmPath(`/guest-memfds/${s.guest_memfd}/memory-attributes`),
        { offset: hex(offset), size: d.size, attributes });
    }
    if (state.vm.semantics === "linux") {
      return api("PUT", vmPath("/memory-attributes"), { address: d.gpa, size: d.size, attributes });
    }
    return api("POST", vmPath(`/memory-encrypt/${d.to === "private" ? "reg" : "unreg"}-region`), { addr: d.gpa, size: d.size });
  });
  form("#fault", (d) => {
    const body = { gpa: d.gpa, write: Boolean(d.write) };
    if (d.access) body.private = d.access === "true";
    if (d.mmu_seq) body.mmu_seq = d.mmu_seq;
    return api("POST", vmPath("/faults"), body);
  });
  form("#prefault", (d) => api("POST", vmPath("/prefault"), { gpa: d.gpa, size: d.size }));
  form("#notifier", (d) => api("POST", vmPath("/mmu-notifier/invalidations"), { hva_start: d.hva_start, hva_end: d.hva_end }));
  form("#fallocate", (d) => api("POST", vmPath(`/guest-memfds/${Number(d.fd)}/fallocate`),
    { mode: Number(d.mode), offset: d.offset, len: d.len }));
  form("#mmap", (d) => api("POST", vmPath(`/guest-memfds/${Number(d.fd)}/mmap`), { offset: d.offset, length: d.length }));
  form("#touch", (d) => api("POST", vmPath(`/host-mappings/${Number(d.mapping)}/touch`),
    { offset: d.offset, size: d.size, write: Boolean(d.write) }));
  form("#pin", (d) => api("POST", vmPath(`/host-mappings/${Number(d.mapping)}/pin`), { offset: d.offset, size: d.size }));
  form("#inject", (d) => api("PUT", vmPath("/fault-injection"), { fail_nth: d.fail_nth ? Number(d.fail_nth) : null }));
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("#token").value;
    sessionStorage.setItem("kvm-memattr-token", state.token);
    $("#token-form").hidden = true;
    clearError();
    boot();
  });
}

// ------------------------------------------------------------------ the explorer

async function loadVariants() {
  const { variants } = await api("GET", "/v1/explorer/variants");
  const select = $("#explore select[name=variant]");
  select.replaceChildren(...variants.map((v) => {
    const o = document.createElement("option");
    o.value = o.textContent = v.name;
    o.title = v.description;
    if (v.name === "reviewer-reorder") o.selected = true;
    return o;
  }));
}

function setupExplorer() {
  $("#explore").addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError();
    const d = Object.fromEntries(new FormData(e.target));
    const body = { variant: d.variant, npages: Number(d.npages), to: d.to, fault_gfn_offset: Number(d.fault_gfn_offset),
      fault_access: d.fault_access, fail_nth: d.fail_nth ? Number(d.fail_nth) : null,
      pinned: d.pinned.trim() ? d.pinned.split(",").map((o) => Number(o.trim())) : null };
    try {
      drawRun(await api("POST", "/v1/explorer/runs", body));
    } catch (err) { showError(err); }
  });
}

function drawRun(run) {
  const o = run.outcomes;
  const ce = run.counterexample;
  $("#explore-verdict").textContent = `${run.variant}: ${run.violations} of ${run.schedules} schedules violate an invariant` +
    ` (fault outcomes: mapped ${o.mapped}, retry ${o.retry}, memory_fault_exit ${o.memory_fault_exit})` +
    (ce ? ` — shortest counterexample: ${ce.violated}: ${ce.detail}` : "");
  const table = $("#timeline");
  table.replaceChildren();
  if (!ce) return;
  // A punch-hole race names its second lane after it and shows the file's pages (A allocated, . freed).
  const punch = ce.trace.some((t) => t.allocated !== null && t.allocated !== undefined);
  const head = table.insertRow();
  const lane = punch ? "punch-hole" : "conversion";
  for (const h of ["#", "vCPU", lane, "seq", "in_progress", "attributes", "spte", ...(punch ? ["file"] : [])]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  ce.trace.forEach((t, i) => {
    const tr = table.insertRow();
    if (i === ce.trace.length - 1) tr.className = "last";
    tr.insertCell().textContent = String(i + 1);
    const v = tr.insertCell(); v.className = "vcpu"; v.textContent = t.actor === "vcpu" ? t.step : "";
    const c = tr.insertCell(); c.className = "conversion"; c.textContent = t.actor !== "vcpu" ? t.step : "";
    tr.insertCell().textContent = String(t.seq);
    tr.insertCell().textContent = String(t.in_progress);
    tr.insertCell().textContent = t.attributes.map((p) => (p ? "P" : "s")).join("");
    tr.insertCell().textContent = t.mapping === null ? "-" : (t.mapping.private ? "P" : "s");
    if (punch) tr.insertCell().textContent = t.allocated.map((a) => (a ? "A" : ".")).join("");
  });
}

// ------------------------------------------------------------------ start

async function loadProfiles() {
  const { default: dflt, profiles } = await api("GET", "/v1/host-profiles");
  const select = $("#create-vm select[name=profile]");
  select.replaceChildren(...profiles.map((p) => {
    const o = document.createElement("option");
    o.value = o.textContent = p.name;
    o.title = p.description;
    o.selected = p.name === dflt;
    return o;
  }));
}

async function boot() {
  try {
    await loadProfiles();
    const vms = await loadVms();
    await loadVariants();
    const wanted = new URLSearchParams(location.search).get("vm");
    const first = vms.find((v) => v.id === wanted) || (wanted ? null : vms[0]);
    if (first) await selectVm(first.id);
  } catch (err) {
    showError(err);
  }
  document.body.dataset.ready = "1";  // the first view is drawn: what a screenshot can wait for
}

setupMap();
setupActions();
setupExplorer();
boot();
window.addEventListener("resize", () => { if (state.vm) drawMap().catch(showError); });
