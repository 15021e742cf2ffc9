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
        main.appendChild(h);
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
      main.appendChild(nglHandle);
    }
    const ngl = dragging && dragging.kind === "ngl" ? dragging.ngl : model.get("ngl");
    nglHandle.style.left = pct(N - ngl);
    nglHandle.setAttribute("aria-valuenow", String(ngl));
    nglHandle.title = `-ngl ${ngl}: the last ${ngl} layers go to the devices; drag, or focus and use the arrow keys`;
  }

  function redraw() {
    const cs = cells();
    const colors = model.get("colors");
    cellEls = buildCells(main, cs.length, cellEls, "gls-cell");
    // cells were rebuilt: put the handles back on top
    handles.forEach((h) => main.appendChild(h));
    if (nglHandle) main.appendChild(nglHandle);
    paint(main, cellEls, cs, colors);
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

  // the cells after moving boundary k to position b (in cells) or -ngl to ngl
  function moved(target, pos) {
    const cs = model.get("cells");
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
      const now = dragging ? dragging.ngl : model.get("ngl");
      if (m.ngl === now) return;
      if (dragging) dragging.ngl = m.ngl;
      send({ ngl: m.ngl });
    } else {
      const before = segmentCounts(cells(), model.get("segments"));
      if (m.counts.every((c, i) => c === before[i])) return;
      local = dragging ? m.cells : null;
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
    h.setPointerCapture(e.pointerId);
    dragging = { ...target, ngl: model.get("ngl") };
    root.classList.add("gls-dragging");
    const move = (ev) => apply(target, posOf(ev));
    const up = (ev) => {
      apply(target, posOf(ev));
      h.removeEventListener("pointermove", move);
      h.removeEventListener("pointerup", up);
      h.removeEventListener("pointercancel", up);
      dragging = null;
      local = null;
      root.classList.remove("gls-dragging");
      redraw();
    };
    h.addEventListener("pointermove", move);
    h.addEventListener("pointerup", up);
    h.addEventListener("pointercancel", up);
  }

  function key(e, target) {
    const step = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1 }[e.key];
    if (!step) return;
    e.preventDefault();
    e.stopPropagation();    // JupyterLab must not move between cells
    const g = geometry(model.get("cells"));
    const pos = target.kind === "ngl" ? n() - model.get("ngl") : g.cum[target.k];
    apply(target, pos + step);
  }

  for (const name of ["cells", "segments", "colors", "draggable", "fit_cells", "fit_label", "ngl"]) {
    model.on(`change:${name}`, () => { if (!dragging) local = null; redraw(); });
  }
  redraw();
}

export default { render };
