// The lab's layer strip (gpulab.ui.strip.LayerStrip): one cell per block plus the output layer,
// coloured by the device llama.cpp puts it on (host grey). Boundaries between devices and the
// -ngl handle are dragged with the mouse or moved one layer per arrow key; the widget only sends
// a request ({counts} or {ngl}) and redraws what Python answers (the planner's placement).

const HOST = "CPU";

function segmentCounts(cells, segments) {
  return segments.map((s) => cells.filter((c) => c === s.name).length);
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "gpulab-strip";
  const main = document.createElement("div");
  main.className = "gls-row gls-main";
  const cellRow = document.createElement("div");     // the cells; rebuilt when their number changes
  cellRow.className = "gls-cells";
  const overlay = document.createElement("div");     // the handles: never moved in the DOM, so a
  overlay.className = "gls-overlay";                 // drag under way keeps its pointer
  main.append(cellRow, overlay);
  const axis = document.createElement("div");
  axis.className = "gls-axis";
  const fitRow = document.createElement("div");
  fitRow.className = "gls-row gls-fit";
  const fitLabel = document.createElement("div");
  fitLabel.className = "gls-fit-label";
  root.append(main, axis, fitRow, fitLabel);
  el.appendChild(root);

  let cellEls = [];
  let fitEls = [];
  let handles = [];       // device boundaries, k = between segment k and k+1
  let nglHandle = null;
  let dragging = null;    // {kind: "boundary"|"ngl", k}
  let local = null;       // the cells shown while a drag is under way
  let seq = 0;
  let pendingNgl = null;  // -ngl sent, not yet answered: arrow keys pressed fast build on it

  const cells = () => local || model.get("cells");
  const n = () => model.get("cells").length;

  function send(req) {
    seq += 1;
    model.set("request", { ...req, seq });
    model.save_changes();
  }

  function buildCells(row, count, list, cls) {
    if (list.length !== count) {
      row.replaceChildren();
      list = [];
      for (let i = 0; i < count; i++) {
        const c = document.createElement("div");
        c.className = cls;
        row.appendChild(c);
        list.push(c);
      }
    }
    return list;
  }

  function paint(row, els, names, colors) {
    const last = names.length - 1;
    names.forEach((name, i) => {
      const c = els[i];
      c.style.background = colors[name] || "#bbb";
      c.title = `${i === last ? "output layer" : "layer " + i}: ${name}`;
      c.classList.toggle("gls-out", i === last);
    });
  }

  // positions (in cells from the left) of the boundaries of the current cells
  function geometry(cs) {
    const segs = model.get("segments");
    const counts = segmentCounts(cs, segs);
    const total = counts.reduce((a, b) => a + b, 0);
    const start = cs.length - total;
    const cum = [];
    let acc = start;
    for (const c of counts) { acc += c; cum.push(acc); }
    return { segs, counts, start, cum };
  }

  function place() {
    const cs = cells();
    const g = geometry(cs);
    const N = cs.length;
    const pct = (x) => `${(100 * x) / N}%`;
    const draggable = model.get("draggable");
    const wanted = draggable ? Math.max(g.segs.length - 1, 0) : 0;
    if (handles.length !== wanted && !dragging) {
      handles.forEach((h) => h.remove());
      handles = [];
      for (let k = 0; k < wanted; k++) {
        const h = document.createElement("div");
        h.className = "gls-boundary";
        h.tabIndex = 0;
        h.setAttribute("role", "slider");
        h.dataset.k = String(k);
        h.addEventListener("pointerdown", (e) => startDrag(e, { kind: "boundary", k }));
        h.addEventListener("keydown", (e) => key(e, { kind: "boundary", k }));
        overlay.appendChild(h);
        handles.push(h);
      }
    }
    handles.forEach((h, k) => {
      if (!g.segs[k + 1]) return;
      h.style.left = pct(g.cum[k]);
      const a = g.segs[k].name, b = g.segs[k + 1].name;
      h.setAttribute("aria-label", `boundary ${a} | ${b}`);
      h.title = `${a} ${g.counts[k]} | ${b} ${g.counts[k + 1]} layers: drag, or focus and use the arrow keys`;
      h.setAttribute("aria-valuenow", String(g.counts[k]));
    });
    if (!nglHandle) {
      nglHandle = document.createElement("div");
      nglHandle.className = "gls-ngl";
      nglHandle.tabIndex = 0;
      nglHandle.setAttribute("role", "slider");
      nglHandle.setAttribute("aria-label", "-ngl");
      nglHandle.addEventListener("pointerdown", (e) => startDrag(e, { kind: "ngl" }));
      nglHandle.addEventListener("keydown", (e) => key(e, { kind: "ngl" }));
      overlay.appendChild(nglHandle);
    }
    const ngl = dragging && dragging.kind === "ngl" ? dragging.ngl : currentNgl();
    nglHandle.style.left = pct(N - ngl);
    nglHandle.setAttribute("aria-valuenow", String(ngl));
    nglHandle.title = `-ngl ${ngl}: the last ${ngl} layers go to the devices; drag, or focus and use the arrow keys`;
  }

  function redraw() {
    const cs = cells();
    const colors = model.get("colors");
    cellEls = buildCells(cellRow, cs.length, cellEls, "gls-cell");
    paint(cellRow, cellEls, cs, colors);
    const N = cs.length;
    axis.textContent = "";
    for (const [i, txt] of [[0, "0"], [Math.floor((N - 1) / 2), String(Math.floor((N - 1) / 2))], [N - 1, "out"]]) {
      const s = document.createElement("span");
      s.style.left = `${(100 * (i + 0.5)) / N}%`;
      s.textContent = txt;
      axis.appendChild(s);
    }
    const fit = model.get("fit_cells");
    fitRow.style.display = fit.length ? "" : "none";
    fitEls = buildCells(fitRow, fit.length, fitEls, "gls-cell");
    paint(fitRow, fitEls, fit, colors);
    fitLabel.textContent = model.get("fit_label");
    place();
  }

  function currentNgl() {
    return pendingNgl !== null ? pendingNgl : model.get("ngl");
  }

  // the cells after moving boundary k to position b (in cells) or -ngl to ngl
  function moved(target, pos) {
    const cs = cells();
    const g = geometry(cs);
    if (target.kind === "ngl") {
      const ngl = Math.max(0, Math.min(cs.length, cs.length - pos));
      return { ngl };
    }
    const k = target.k;
    const lo = k === 0 ? g.start : g.cum[k - 1];
    const hi = g.cum[k + 1];
    const b = Math.max(lo, Math.min(hi, pos));
    const counts = g.counts.slice();
    counts[k] = b - lo;
    counts[k + 1] = hi - b;
    const out = cs.slice(0, g.start);
    g.segs.forEach((s, i) => { for (let j = 0; j < counts[i]; j++) out.push(s.name); });
    return { counts, cells: out };
  }

  function apply(target, pos) {
    const m = moved(target, pos);
    if (target.kind === "ngl") {
      const now = dragging ? dragging.ngl : currentNgl();
      if (m.ngl === now) return;
      if (dragging) dragging.ngl = m.ngl;
      pendingNgl = m.ngl;
      send({ ngl: m.ngl });
    } else {
      const before = segmentCounts(cells(), model.get("segments"));
      if (m.counts.every((c, i) => c === before[i])) return;
      local = m.cells;      // shown until Python answers this request
      send({ counts: m.counts });
    }
    redraw();
  }

  function posOf(e) {
    const r = main.getBoundingClientRect();
    return Math.round(((e.clientX - r.left) / r.width) * n());
  }

  function startDrag(e, target) {
    e.preventDefault();
    const h = e.currentTarget;
    h.focus();
    dragging = { ...target, ngl: model.get("ngl") };
    root.classList.add("gls-dragging");
    const move = (ev) => apply(target, posOf(ev));
    const up = (ev) => {
      apply(target, posOf(ev));
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
      window.removeEventListener("pointercancel", up);
      dragging = null;
      root.classList.remove("gls-dragging");
      redraw();
    };
    // on the window, not the handle: the pointer may leave the handle's 14 px while dragging
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
    window.addEventListener("pointercancel", up);
  }

  function key(e, target) {
    const step = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1 }[e.key];
    if (!step) return;
    e.preventDefault();
    e.stopPropagation();    // JupyterLab must not move between cells
    const g = geometry(cells());
    const pos = target.kind === "ngl" ? n() - currentNgl() : g.cum[target.k];
    apply(target, pos + step);
  }

  // Python answers each request with the plan and `applied` (the last request's seq it drew):
  // the local preview stays until the answer to the last request sent
  function answered() {
    if (model.get("applied") >= seq) {
      pendingNgl = null;
      if (!dragging) local = null;
    }
    redraw();
  }
  for (const name of ["cells", "segments", "colors", "draggable", "fit_cells", "fit_label", "ngl", "applied"]) {
    model.on(`change:${name}`, answered);
  }
  redraw();
}

export default { render };
