/* jfig explorer: an interactive view of one feature interaction graph.
   Everything comes from the JSON payload in #jfig-data (docs/explorer_payload.md); nothing is fetched
   except the POSTs to api/steer and api/attribution when the page is served live. Plain JavaScript, no libraries. */
(function () {
  "use strict";

  // ============================================================ helpers
  const $ = (id) => document.getElementById(id);
  const COLOR = {
    exc: "#2563eb", inh: "#dc2626", gate: "#9333ea",
    same: "#9ca3af", gained: "#16a34a", lost: "#dc2626", flipped: "#f59e0b",
    bg: "#ffffff", node: "#334155", nodeDim: "#cbd5e1", nodeEmph: "#0f172a", ring: "#f59e0b", guide: "#eef2f7",
  };
  const KIND_NAMES = ["excitatory", "inhibitory", "gating"];
  const STATUS_NAMES = ["same", "gained", "lost", "flipped"];

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    if (attrs) for (const k in attrs) if (attrs[k] != null) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    if (attrs) for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function clamp(v, lo, hi) { return v < lo ? lo : v > hi ? hi : v; }
  // a number to 3 significant digits ("—" when missing)
  function fmt3(x) {
    if (x == null || typeof x !== "number" || !isFinite(x)) return "—";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e6 || a < 1e-4) return x.toExponential(2);
    return String(Number(x.toPrecision(3)));
  }
  function fmtP(p) {
    if (p == null || typeof p !== "number" || !isFinite(p)) return "—";
    if (p === 0) return "0";
    if (p < 1e-3) return p.toExponential(1);
    return String(Number(p.toPrecision(2)));
  }
  function fmtRate(r) {
    if (r == null || typeof r !== "number" || !isFinite(r)) return "unknown";
    return fmt3(r * 100) + "%";
  }
  function showError(msg) {
    const box = $("error");
    box.textContent = msg;
    box.hidden = false;
  }
  function hideError() { const box = $("error"); box.hidden = true; box.textContent = ""; }
  // whitespace made visible: newline ↵, tab ⇥, carriage return ␍; a token of spaces only shows them as ·
  function visibleText(s) {
    s = String(s);
    if (s.length && /^ +$/.test(s)) return s.replace(/ /g, "\u00b7");
    return s.replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }

  // ============================================================ data
  const tParse = performance.now();
  let P;
  try {
    P = JSON.parse($("jfig-data").textContent);
  } catch (err) {
    showError("could not read the page's graph data: " + err.message);
    return;
  }
  const parseMs = performance.now() - tParse;
  if (!P || P.format !== "jfig-explorer") {
    showError("this page's data is not a jfig explorer payload (format " + (P && P.format) + ")");
  }

  const SITES = Array.isArray(P.sites) ? P.sites : [];
  const S = SITES.length;
  const siteName = SITES.map((s) => String(s.name));
  const siteLayer = SITES.map((s, i) => (typeof s.layer === "number" ? s.layer : i));
  const NODES = P.nodes || {};
  const N = (NODES.site || []).length;
  const nSite = Int32Array.from(NODES.site || []);
  const nFeat = Float64Array.from(NODES.feature || []);
  const nY = Float64Array.from(NODES.y || new Array(N).fill(0.5), (v) => (v == null || !isFinite(v) ? 0.5 : v));
  const nDeg = Int32Array.from(NODES.degree || new Array(N).fill(0), (v) => v || 0);
  const nLabel = NODES.label || [];
  const nRate = NODES.firing_rate || [];
  const nLayer = Float64Array.from(nSite, (s) => siteLayer[s]);

  const ED = P.edges || {};
  const E = (ED.source || []).length;
  const fillE = (v) => new Array(E).fill(v);
  const eSrc = Int32Array.from(ED.source || []);
  const eTgt = Int32Array.from(ED.target || []);
  const eKind = Uint8Array.from(ED.kind || fillE(0));
  const eW = Float64Array.from(ED.weight || fillE(0), (v) => (v == null ? 0 : v));
  const eAbs = Float64Array.from(eW, Math.abs);
  const eP = Float64Array.from(ED.p_value || fillE(null), (v) => (v == null ? NaN : v));
  const eMod = Int32Array.from(ED.modulator || fillE(-1), (v) => (v == null ? -1 : v));
  const eN = ED.n || fillE(null);
  const eEst = ED.estimator || fillE(null);
  const ESTIMATORS = Array.isArray(P.estimators) ? P.estimators : [];
  const COMPARE = P.compare && Array.isArray(ED.status) ? P.compare : null;
  const eStatus = COMPARE ? Uint8Array.from(ED.status) : null;
  const eWB = COMPARE ? (ED.weight_b || fillE(null)) : null;
  const CARDS = P.cards || {};
  const VOCAB = P.vocab || {};
  const CIRCUITS = Array.isArray(P.circuits) ? P.circuits : [];
  const NOTES = Array.isArray(P.notes) ? P.notes : [];
  const LIVE = P.mode === "live";

  function nodeKey(i) { return siteName[nSite[i]] + "#" + nFeat[i]; }
  function nodeText(i) { return nLabel[i] ? nodeKey(i) + " " + nLabel[i] : nodeKey(i); }
  // TransformerLens block sites shortened: blocks.10.hook_resid_post -> L10 resid_post
  function shortSite(name) {
    const m = /^blocks\.(\d+)\.(?:hook_)?(.*)$/.exec(name);
    return m ? "L" + m[1] + " " + m[2] : name;
  }
  function shortKey(i) { return shortSite(siteName[nSite[i]]) + "#" + nFeat[i]; }
  function estimatorName(e) { const k = eEst[e]; return k == null ? null : (ESTIMATORS[k] != null ? ESTIMATORS[k] : String(k)); }
  function tokenText(id) {
    const t = VOCAB[String(id)];
    return t == null ? "\u27e8" + id + "\u27e9" : t;
  }

  const keyToNode = new Map();
  for (let i = 0; i < N; i++) keyToNode.set(nodeKey(i), i);

  // per-column index: nodes of each column sorted by y (hit testing)
  const colCount = new Int32Array(S);
  for (let i = 0; i < N; i++) colCount[nSite[i]]++;
  const colNodes = [], colYs = [];
  let maxColCount = 1;
  for (let c = 0; c < S; c++) { colNodes.push([]); maxColCount = Math.max(maxColCount, colCount[c]); }
  for (let i = 0; i < N; i++) colNodes[nSite[i]].push(i);
  for (let c = 0; c < S; c++) {
    const list = colNodes[c].sort((a, b) => nY[a] - nY[b]);
    colNodes[c] = Int32Array.from(list);
    colYs.push(Float64Array.from(list, (i) => nY[i]));
  }

  // adjacency (CSR): first-order in/out edges and gating rows by each node in any role
  const inStart = new Int32Array(N + 1), outStart = new Int32Array(N + 1), gStart = new Int32Array(N + 1);
  for (let e = 0; e < E; e++) {
    const s = eSrc[e], t = eTgt[e];
    if (eKind[e] === 2) {
      gStart[s + 1]++;
      if (t !== s) gStart[t + 1]++;
      const m = eMod[e];
      if (m >= 0 && m !== s && m !== t) gStart[m + 1]++;
    } else { outStart[s + 1]++; inStart[t + 1]++; }
  }
  for (let i = 0; i < N; i++) { inStart[i + 1] += inStart[i]; outStart[i + 1] += outStart[i]; gStart[i + 1] += gStart[i]; }
  const inList = new Int32Array(inStart[N]), outList = new Int32Array(outStart[N]), gList = new Int32Array(gStart[N]);
  {
    const ic = inStart.slice(0, N), oc = outStart.slice(0, N), gc = gStart.slice(0, N);
    for (let e = 0; e < E; e++) {
      const s = eSrc[e], t = eTgt[e];
      if (eKind[e] === 2) {
        gList[gc[s]++] = e;
        if (t !== s) gList[gc[t]++] = e;
        const m = eMod[e];
        if (m >= 0 && m !== s && m !== t) gList[gc[m]++] = e;
      } else { outList[oc[s]++] = e; inList[ic[t]++] = e; }
    }
  }
  function edgesOf(start, list, i) { return Array.from(list.subarray(start[i], start[i + 1])); }

  // strength order (the payload is sorted strongest first; sort here only if it is not)
  let order;
  {
    let sorted = true;
    for (let e = 1; e < E; e++) if (eAbs[e] > eAbs[e - 1]) { sorted = false; break; }
    order = new Int32Array(E);
    for (let e = 0; e < E; e++) order[e] = e;
    if (!sorted) order.sort((a, b) => eAbs[b] - eAbs[a] || a - b);
  }
  const rank = new Int32Array(E);
  for (let k = 0; k < E; k++) rank[order[k]] = k;
  const maxAbs = E && eAbs[order[0]] > 0 ? eAbs[order[0]] : 1;

  // drawing groups: (width bucket × colour × dashed), weakest bucket first; one stroke per group
  const NB = 6;
  const BW = [], BA = [];
  for (let b = 0; b < NB; b++) {
    const s = (b + 1) / NB;
    BW.push(0.5 + 2.6 * Math.pow(s, 1.6));
    BA.push(0.16 + 0.72 * s);
  }
  const PALETTE = COMPARE ? [COLOR.same, COLOR.gained, COLOR.lost, COLOR.flipped] : [COLOR.exc, COLOR.inh, COLOR.gate];
  const NC = PALETTE.length, NG = NB * NC * 2;
  const eGroup = new Uint16Array(E);
  const grpStart = new Int32Array(NG + 1);
  for (let e = 0; e < E; e++) {
    const b = Math.min(NB - 1, Math.floor(Math.sqrt(eAbs[e] / maxAbs) * NB));
    const c = COMPARE ? Math.min(NC - 1, eStatus[e]) : Math.min(NC - 1, eKind[e]);
    const g = (b * NC + c) * 2 + (eKind[e] === 2 ? 1 : 0);
    eGroup[e] = g;
    grpStart[g + 1]++;
  }
  for (let g = 0; g < NG; g++) grpStart[g + 1] += grpStart[g];
  const grpList = new Int32Array(E);
  {
    const cur = grpStart.slice(0, NG);
    for (let k = E - 1; k >= 0; k--) { const e = order[k]; grpList[cur[eGroup[e]]++] = e; }   // weak→strong inside a group
  }
  function groupStyle(g) { const d = g & 1, c = (g >> 1) % NC, b = Math.floor((g >> 1) / NC); return { b, c, d }; }

  const nBaseR = Float64Array.from(nDeg, (d) => Math.min(6, 1.7 + 0.45 * Math.log2(1 + d)));

  // ============================================================ layout / view transform
  // world: x = column index, y = nodes.y; screen: sx = ax*x + bx, sy = ay*y + by (CSS pixels)
  const canvas = $("graph"), wrap = $("view");
  const ctx = canvas.getContext("2d");
  const V = { ax: 1, bx: 0, ay: 1, by: 0, W: 1, H: 1, dpr: 1, fitted: true, ayFit: 1 };
  const M = { left: 70, right: 70, top: 44, bottom: 24 };

  function resizeCanvas() {
    const r = wrap.getBoundingClientRect();
    const W = Math.max(50, Math.round(r.width)), H = Math.max(50, Math.round(r.height));
    const dpr = window.devicePixelRatio || 1;
    if (W === V.W && H === V.H && dpr === V.dpr && canvas.width === Math.round(W * dpr)) return false;
    V.W = W; V.H = H; V.dpr = dpr;
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    canvas.style.width = W + "px"; canvas.style.height = H + "px";
    if (V.fitted) fit();
    return true;
  }
  function fit() {
    const w = V.W - M.left - M.right, h = V.H - M.top - M.bottom;
    if (S > 1) { V.ax = Math.max(1, w) / (S - 1); V.bx = M.left; } else { V.ax = 0; V.bx = V.W / 2; }
    V.ay = Math.max(10, h); V.by = M.top; V.ayFit = V.ay; V.fitted = true;
  }
  function zoomAt(f, cx, cy) {
    const z = V.ay / V.ayFit;
    f = clamp(z * f, 0.2, 20000) / z;
    V.ax *= f; V.bx = cx - (cx - V.bx) * f;
    V.ay *= f; V.by = cy - (cy - V.by) * f;
    V.fitted = false;
  }
  function panBy(dx, dy) { V.bx += dx; V.by += dy; V.fitted = false; }
  function zoomLevel() { return V.ay / V.ayFit; }

  const sx = new Float64Array(N), sy = new Float64Array(N), nr = new Float64Array(N);
  function project() {
    const zs = clamp(Math.sqrt(zoomLevel()), 1, 3);
    for (let i = 0; i < N; i++) {
      sx[i] = V.ax * nSite[i] + V.bx; sy[i] = V.ay * nY[i] + V.by; nr[i] = nBaseR[i] * zs;
    }
  }
  function inViewport(i) { return sx[i] >= 0 && sx[i] <= V.W && sy[i] >= 0 && sy[i] <= V.H; }

  // ============================================================ filters
  const F = { kinds: [true, true, true], status: [true, true, true, true], minW: 0, maxP: 1, lmin: -Infinity, lmax: Infinity };
  const pass = new Uint8Array(E);
  let passCount = 0;
  const layerMin = S ? Math.min.apply(null, siteLayer) : 0, layerMax = S ? Math.max.apply(null, siteLayer) : 0;
  function num(id, dflt) { const v = parseFloat($(id).value); return isFinite(v) ? v : dflt; }
  function readFilters() {
    F.kinds = [$("filter-excitatory").checked, $("filter-inhibitory").checked, $("filter-gating").checked];
    if (COMPARE) F.status = ["filter-same", "filter-gained", "filter-lost", "filter-flipped"].map((id) => $(id).checked);
    F.minW = num("filter-weight", 0);
    F.maxP = num("filter-p", Infinity);
    F.lmin = num("filter-layer-min", -Infinity);
    F.lmax = num("filter-layer-max", Infinity);
  }
  function applyFilters() {
    readFilters();
    const k0 = F.kinds[0], k1 = F.kinds[1], k2 = F.kinds[2], minW = F.minW, maxP = F.maxP, lmin = F.lmin, lmax = F.lmax;
    let count = 0;
    for (let e = 0; e < E; e++) {
      const k = eKind[e];
      let ok = (k === 0 ? k0 : k === 1 ? k1 : k2) && eAbs[e] >= minW;
      if (ok) { const p = eP[e]; ok = p !== p || p <= maxP; }
      if (ok) {
        const a = nLayer[eSrc[e]], b = nLayer[eTgt[e]];
        ok = a >= lmin && a <= lmax && b >= lmin && b <= lmax;
      }
      if (ok && COMPARE) ok = F.status[eStatus[e]] === true;
      pass[e] = ok ? 1 : 0;
      if (ok) count++;
    }
    passCount = count;
    $("edge-count").textContent = passCount + " of " + E + " edges";
  }
  function onFilterChange() {
    applyFilters();
    markCardRows();
    requestDraw(false);
  }

  // ============================================================ emphasis (selection, behaviour circuit, steering)
  let selectedNode = -1;
  let circuit = null;                      // {index, nodes:Set, seeds:Set, edges:Set}
  let steerObs = null;                     // Map node -> observed change
  let steerSource = -1;
  const emphEdge = new Uint8Array(E);
  let emphEdges = [];                      // edge indices, sorted by group then strength
  let hasEmph = false;
  function updateEmphasis() {
    for (const e of emphEdges) emphEdge[e] = 0;
    const list = [];
    if (selectedNode >= 0) {
      const i = selectedNode;
      for (const lst of [edgesOf(inStart, inList, i), edgesOf(outStart, outList, i), edgesOf(gStart, gList, i)])
        for (const e of lst) if (!emphEdge[e]) { emphEdge[e] = 1; list.push(e); }
    }
    if (circuit) for (const e of circuit.edges) if (e >= 0 && e < E && !emphEdge[e]) { emphEdge[e] = 1; list.push(e); }
    list.sort((a, b) => eGroup[a] - eGroup[b] || rank[b] - rank[a]);
    emphEdges = list;
    hasEmph = selectedNode >= 0 || circuit != null || steerObs != null;
  }

  // ============================================================ drawing
  let lastRender = { ms: 0, nodes: 0, edges: 0, lod: false };
  const LOD_MAX = 15000;

  // append edge e to the current path if any of it is on screen; true when appended
  function pathEdge(e, L, T, R, B) {
    const s = eSrc[e], t = eTgt[e];
    const x1 = sx[s], y1 = sy[s], x2 = sx[t], y2 = sy[t];
    let vis = !((x1 < L && x2 < L) || (x1 > R && x2 > R) || (y1 < T && y2 < T) || (y1 > B && y2 > B));
    let mVis = false, mx = 0, my = 0;
    const mx2 = (x1 + x2) / 2, my2 = (y1 + y2) / 2;
    if (eKind[e] === 2 && eMod[e] >= 0) {
      mx = sx[eMod[e]]; my = sy[eMod[e]];
      mVis = !((mx < L && mx2 < L) || (mx > R && mx2 > R) || (my < T && my2 < T) || (my > B && my2 > B));
    }
    if (!vis && !mVis) return false;
    if (vis) {
      ctx.moveTo(x1, y1);
      if (nSite[s] === nSite[t]) {            // same column: a gentle arc so it does not hide in the column
        const bend = Math.max(12, Math.abs(y2 - y1) * 0.3);
        ctx.quadraticCurveTo(x1 + bend, (y1 + y2) / 2, x2, y2);
      } else ctx.lineTo(x2, y2);
    }
    if (mVis) { ctx.moveTo(mx, my); ctx.lineTo(mx2, my2); }
    return true;
  }
  function strokeGroup(g, alphaMul, widthAdd) {
    const st = groupStyle(g);
    ctx.strokeStyle = PALETTE[st.c];
    ctx.globalAlpha = Math.min(1, BA[st.b] * alphaMul);
    ctx.lineWidth = BW[st.b] + widthAdd;
    ctx.setLineDash(st.d ? [5, 4] : []);
    ctx.stroke();
  }
  function lodCutoff(L, T, R, B) {
    let c = 0;
    for (let k = 0; k < E; k++) {
      const e = order[k];
      if (!pass[e]) continue;
      const s = eSrc[e], t = eTgt[e];
      const x1 = sx[s], y1 = sy[s], x2 = sx[t], y2 = sy[t];
      if ((x1 < L && x2 < L) || (x1 > R && x2 > R) || (y1 < T && y2 < T) || (y1 > B && y2 > B)) continue;
      if (++c >= LOD_MAX) return k;
    }
    return E;
  }
  function drawEdges(lod) {
    const pad = 8, L = -pad, T = -pad, R = V.W + pad, B = V.H + pad;
    const cutoff = lod && passCount > LOD_MAX ? lodCutoff(L, T, R, B) : E;
    const alphaMul = hasEmph ? 0.12 : 1;
    let count = 0;
    ctx.lineCap = "butt";
    for (let g = 0; g < NG; g++) {
      const a = grpStart[g], z = grpStart[g + 1];
      if (a === z) continue;
      ctx.beginPath();
      let any = 0;
      for (let k = a; k < z; k++) {
        const e = grpList[k];
        if (!pass[e] || rank[e] > cutoff || emphEdge[e]) continue;
        if (pathEdge(e, L, T, R, B)) any++;
      }
      if (any) { strokeGroup(g, alphaMul, 0); count += any; }
    }
    // emphasised edges on top, full strength
    let k = 0;
    while (k < emphEdges.length) {
      const g = eGroup[emphEdges[k]];
      ctx.beginPath();
      let any = 0;
      for (; k < emphEdges.length && eGroup[emphEdges[k]] === g; k++) {
        const e = emphEdges[k];
        if (pass[e] && pathEdge(e, L, T, R, B)) any++;
      }
      if (any) { strokeGroup(g, 1.6, 0.6); count += any; }
    }
    ctx.globalAlpha = 1;
    ctx.setLineDash([]);
    return count;
  }
  function nodeVisible(i, r) { return sx[i] >= -r && sx[i] <= V.W + r && sy[i] >= -r && sy[i] <= V.H + r; }
  function addNode(i, r) {
    const x = sx[i], y = sy[i];
    if (r < 1.2) ctx.rect(x - r, y - r, 2 * r, 2 * r);
    else { ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 6.283185307179586); }
  }
  // nodes touched by a passing emphasised edge, the selection and the circuit's nodes
  function emphasisedNodes() {
    const set = new Set();
    if (selectedNode >= 0) set.add(selectedNode);
    for (const e of emphEdges) {
      if (!pass[e]) continue;
      set.add(eSrc[e]); set.add(eTgt[e]);
      if (eMod[e] >= 0) set.add(eMod[e]);
    }
    if (circuit) for (const i of circuit.nodes) set.add(i);
    return set;
  }
  function drawNodes(emph) {
    let count = 0;
    const lmin = F.lmin, lmax = F.lmax;
    // pass 1: ordinary nodes (dimmed when something is emphasised or their layer is filtered out)
    // nodes of a column are visited by y; one that would cover the same half pixel as the last one
    // drawn of its class with no larger radius is skipped (identical pixels, far fewer arcs when dense)
    const normal = [], dim = [];
    for (let c = 0; c < S; c++) {
      const x = V.ax * c + V.bx;
      if (x < -12 || x > V.W + 12) continue;
      const ids = colNodes[c];
      let lastN = -1e9, lastNR = 0, lastD = -1e9, lastDR = 0;
      for (let k = 0; k < ids.length; k++) {
        const i = ids[k], r = nr[i];
        if (!nodeVisible(i, r)) continue;
        count++;
        if (emph.has(i)) continue;
        const y = sy[i];
        if (hasEmph || nLayer[i] < lmin || nLayer[i] > lmax) {
          if (y - lastD < 0.5 && r <= lastDR) continue;
          dim.push(i); lastD = y; lastDR = r;
        } else {
          if (y - lastN < 0.5 && r <= lastNR) continue;
          normal.push(i); lastN = y; lastNR = r;
        }
      }
    }
    for (const [list, color] of [[dim, COLOR.nodeDim], [normal, COLOR.node]]) {
      if (!list.length) continue;
      ctx.beginPath();
      for (const i of list) addNode(i, nr[i]);
      ctx.fillStyle = color;
      ctx.fill();
    }
    // pass 2: emphasised nodes, then rings (circuit seeds, selection), then the steering overlay
    if (emph.size) {
      ctx.beginPath();
      for (const i of emph) if (nodeVisible(i, nr[i] + 1)) addNode(i, nr[i] + 1);
      ctx.fillStyle = COLOR.nodeEmph;
      ctx.fill();
    }
    if (circuit && circuit.seeds.size) {
      ctx.beginPath();
      for (const i of circuit.seeds) if (nodeVisible(i, nr[i] + 5)) { ctx.moveTo(sx[i] + nr[i] + 4, sy[i]); ctx.arc(sx[i], sy[i], nr[i] + 4, 0, 6.283185307179586); }
      ctx.strokeStyle = COLOR.gate; ctx.lineWidth = 2; ctx.stroke();
    }
    if (steerObs) {
      let mx = 0;
      for (const v of steerObs.values()) mx = Math.max(mx, Math.abs(v));
      mx = mx || 1;
      for (const [i, v] of steerObs) {
        const r = nr[i] + 2 + 9 * Math.sqrt(Math.abs(v) / mx);
        if (!nodeVisible(i, r)) continue;
        ctx.beginPath(); ctx.arc(sx[i], sy[i], r, 0, 6.283185307179586);
        ctx.globalAlpha = 0.55; ctx.fillStyle = v >= 0 ? COLOR.exc : COLOR.inh; ctx.fill();
        ctx.globalAlpha = 1; ctx.lineWidth = 1; ctx.strokeStyle = v >= 0 ? "#1e3a8a" : "#7f1d1d"; ctx.stroke();
      }
      if (steerSource >= 0 && nodeVisible(steerSource, 12)) {
        ctx.beginPath(); ctx.arc(sx[steerSource], sy[steerSource], nr[steerSource] + 7, 0, 6.283185307179586);
        ctx.strokeStyle = "#16a34a"; ctx.lineWidth = 2.5; ctx.stroke();
      }
    }
    if (selectedNode >= 0 && nodeVisible(selectedNode, 12)) {
      const i = selectedNode, r = nr[i] + 3;
      ctx.beginPath(); ctx.arc(sx[i], sy[i], r, 0, 6.283185307179586);
      ctx.fillStyle = COLOR.nodeEmph; ctx.fill();
      ctx.lineWidth = 2.5; ctx.strokeStyle = COLOR.ring; ctx.stroke();
    }
    return count;
  }
  function fitText(text, maxW, fromStart) {
    if (ctx.measureText(text).width <= maxW) return text;
    let lo = 0, hi = text.length;
    while (lo < hi) {                          // longest kept part that fits with an ellipsis
      const mid = (lo + hi + 1) >> 1;
      const t = fromStart ? "\u2026" + text.slice(text.length - mid) : text.slice(0, mid) + "\u2026";
      if (ctx.measureText(t).width <= maxW) lo = mid; else hi = mid - 1;
    }
    return lo === 0 ? "" : fromStart ? "\u2026" + text.slice(text.length - lo) : text.slice(0, lo) + "\u2026";
  }
  function drawLabels(emph) {
    const spacing = V.ay / maxColCount;
    const maxW = S > 1 ? Math.max(30, V.ax - 18) : 320;
    const list = [];
    if (spacing >= 13) {
      for (let i = 0; i < N && list.length < 3000; i++) if (inViewport(i)) list.push(i);
    }
    if (emph.size <= 400) for (const i of emph) if (inViewport(i)) list.push(i);
    if (!list.length) return;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.lineJoin = "round";
    const seen = new Set();
    for (const i of list) {
      if (seen.has(i)) continue;
      seen.add(i);
      let text;
      if (nLabel[i]) text = fitText(String(nLabel[i]), maxW, false);
      else {
        text = nodeKey(i);
        if (ctx.measureText(text).width > maxW) text = shortKey(i);
        if (ctx.measureText(text).width > maxW) text = fitText("#" + nFeat[i], maxW, false);
      }
      if (!text) continue;
      const x = sx[i] + nr[i] + 4, y = sy[i];
      ctx.strokeStyle = "rgba(255,255,255,0.9)"; ctx.lineWidth = 3; ctx.strokeText(text, x, y);
      ctx.fillStyle = i === selectedNode ? "#000" : "#1f2937"; ctx.fillText(text, x, y);
    }
  }
  function drawColumns() {
    ctx.strokeStyle = COLOR.guide; ctx.lineWidth = 1;
    ctx.beginPath();
    const y0 = Math.max(0, V.by), y1 = Math.min(V.H, V.by + V.ay);
    for (let c = 0; c < S; c++) {
      const x = Math.round(V.ax * c + V.bx) + 0.5;
      if (x < -2 || x > V.W + 2) continue;
      ctx.moveTo(x, y0); ctx.lineTo(x, y1);
    }
    ctx.stroke();
  }
  function drawHeaders() {
    ctx.globalAlpha = 0.92; ctx.fillStyle = COLOR.bg; ctx.fillRect(0, 0, V.W, 26); ctx.globalAlpha = 1;
    ctx.font = "600 12px system-ui, sans-serif"; ctx.textBaseline = "middle"; ctx.textAlign = "center";
    ctx.fillStyle = "#374151";
    const maxW = S > 1 ? Math.max(20, V.ax - 8) : V.W - 20;
    for (let c = 0; c < S; c++) {
      const x = V.ax * c + V.bx;
      if (x < -maxW || x > V.W + maxW) continue;
      let t = siteName[c];
      if (ctx.measureText(t).width > maxW) t = shortSite(t);
      t = fitText(t, maxW, false);
      const half = ctx.measureText(t).width / 2 + 4;
      const xt = x >= 0 && x <= V.W ? clamp(x, half, Math.max(half, V.W - half)) : x;
      const outside = F.lmin > siteLayer[c] || F.lmax < siteLayer[c];
      ctx.fillStyle = outside ? "#cbd5e1" : "#374151";
      ctx.fillText(t, xt, 14);
    }
    ctx.textAlign = "start";
    ctx.strokeStyle = "#e5e7eb"; ctx.beginPath(); ctx.moveTo(0, 26.5); ctx.lineTo(V.W, 26.5); ctx.stroke();
  }
  function draw(lod) {
    const t0 = performance.now();
    resizeCanvas();
    project();
    ctx.setTransform(V.dpr, 0, 0, V.dpr, 0, 0);
    ctx.globalAlpha = 1;
    ctx.fillStyle = COLOR.bg;
    ctx.fillRect(0, 0, V.W, V.H);
    drawColumns();
    const edgesDrawn = drawEdges(lod);
    const emph = emphasisedNodes();
    const nodesDrawn = drawNodes(emph);
    drawLabels(emph);
    drawHeaders();
    const ms = performance.now() - t0;
    lastRender = { ms: ms, nodes: nodesDrawn, edges: edgesDrawn, lod: !!lod };
    api.lastRender = lastRender;
    api.renders++;
    return ms;
  }

  // render scheduling: interaction draws a light frame now and the full frame after 120 ms idle
  let rafId = 0, rafLod = false, idleTimer = 0;
  function requestDraw(lod) {
    rafLod = rafId ? rafLod && lod : lod;
    if (!rafId) rafId = requestAnimationFrame(() => { rafId = 0; draw(rafLod); });
  }
  function interacted() {
    requestDraw(true);
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => requestDraw(false), 120);
  }

  // ============================================================ hit testing
  function hitTest(px, py) {
    let best = -1, bestD = Infinity;
    const tol = 6;
    for (let c = 0; c < S; c++) {
      const x = V.ax * c + V.bx;
      if (Math.abs(px - x) > tol + 10) continue;
      const ys = colYs[c], ids = colNodes[c];
      const lo = (py - tol - 10 - V.by) / V.ay, hi = (py + tol + 10 - V.by) / V.ay;
      let a = 0, b = ys.length;
      while (a < b) { const m = (a + b) >> 1; if (ys[m] < lo) a = m + 1; else b = m; }
      for (let k = a; k < ys.length && ys[k] <= hi; k++) {
        const i = ids[k];
        const d = Math.hypot(px - sx[i], py - sy[i]);
        if (d <= Math.max(tol, nr[i] + 3) && d < bestD) { bestD = d; best = i; }
      }
    }
    return best;
  }
  function canvasPoint(ev) {
    const r = canvas.getBoundingClientRect();
    return [ev.clientX - r.left, ev.clientY - r.top];
  }

  // ============================================================ pointer input (pan, zoom, click, hover)
  const drag = { on: false, x: 0, y: 0, moved: false };
  canvas.addEventListener("mousedown", (ev) => {
    if (ev.button !== 0) return;
    drag.on = true; drag.moved = false;
    [drag.x, drag.y] = [ev.clientX, ev.clientY];
    drag.x0 = ev.clientX; drag.y0 = ev.clientY;
    ev.preventDefault();
  });
  window.addEventListener("mousemove", (ev) => {
    if (drag.on) {
      if (!drag.moved && Math.hypot(ev.clientX - drag.x0, ev.clientY - drag.y0) < 4) return;
      drag.moved = true;
      canvas.classList.add("dragging");
      panBy(ev.clientX - drag.x, ev.clientY - drag.y);
      drag.x = ev.clientX; drag.y = ev.clientY;
      $("tooltip").hidden = true;
      interacted();
      return;
    }
    if (ev.target !== canvas) return;
    const [px, py] = canvasPoint(ev);
    const i = hitTest(px, py);
    const tip = $("tooltip");
    canvas.classList.toggle("over-node", i >= 0);
    if (i < 0) { tip.hidden = true; return; }
    tip.textContent = nodeText(i) + "  (degree " + nDeg[i] + ")";
    tip.hidden = false;
    tip.style.left = Math.min(px + 12, V.W - 200) + "px";
    tip.style.top = (py + 14) + "px";
  });
  window.addEventListener("mouseup", (ev) => {
    if (!drag.on) return;
    drag.on = false;
    canvas.classList.remove("dragging");
    if (drag.moved) return;
    const [px, py] = canvasPoint(ev);
    const i = hitTest(px, py);
    select(i);
  });
  canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [px, py] = canvasPoint(ev);
    const unit = ev.deltaMode === 1 ? 16 : ev.deltaMode === 2 ? 400 : 1;
    zoomAt(Math.exp(-ev.deltaY * unit * 0.0015), px, py);
    interacted();
  }, { passive: false });
  window.addEventListener("keydown", (ev) => {
    const tag = (ev.target && ev.target.tagName) || "";
    if (/INPUT|TEXTAREA|SELECT/.test(tag)) return;
    if (ev.key === "Escape") select(-1);
  });
  $("fit").addEventListener("click", () => { fit(); draw(false); });
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => { if (resizeCanvas()) requestDraw(false); }).observe(wrap);
  } else window.addEventListener("resize", () => { if (resizeCanvas()) requestDraw(false); });

  // ============================================================ feature card
  const cardTables = { in: $("card-in"), out: $("card-out"), gating: $("card-gating") };
  function edgeHead(table, first, second) {
    const head = table.tHead;
    clear(head);
    const tr = el("tr");
    const cols = [first, second, "weight"];
    if (COMPARE) cols.push("weight B", "status");
    cols.push("p", "n", "estimator");
    for (const c of cols) tr.appendChild(el("th", null, c));
    head.appendChild(tr);
  }
  function nodeLink(i, prefix) {
    const b = el("button", { type: "button", class: "link", "data-node": String(i), title: nodeText(i) },
      (prefix ? prefix + " " : "") + shortKey(i) + (nLabel[i] ? " " + nLabel[i] : ""));
    return b;
  }
  function edgeCells(tr, e) {
    tr.appendChild(el("td", { class: "num" }, fmt3(eW[e])));
    if (COMPARE) {
      const wb = eWB[e];
      tr.appendChild(el("td", { class: "num" }, wb == null ? "—" : fmt3(wb)));
      const td = el("td");
      td.appendChild(el("span", { class: "st-" + eStatus[e] }, STATUS_NAMES[eStatus[e]] || String(eStatus[e])));
      tr.appendChild(td);
    }
    tr.appendChild(el("td", { class: "num" }, fmtP(isNaN(eP[e]) ? null : eP[e])));
    tr.appendChild(el("td", { class: "num" }, eN[e] == null ? "—" : String(eN[e])));
    tr.appendChild(el("td", null, estimatorName(e) || "—"));
  }
  function byStrength(a, b) { return eAbs[b] - eAbs[a] || a - b; }
  function fillEdgeTable(table, edgeIds, otherOf) {
    const body = table.tBodies[0];
    clear(body);
    const frag = document.createDocumentFragment();
    for (const e of edgeIds.slice().sort(byStrength)) {
      const j = otherOf(e);
      const tr = el("tr", { "data-edge": String(e), "data-site": siteName[nSite[j]], "data-feature": String(nFeat[j]),
        "data-weight": String(eW[e]) });
      if (!pass[e]) tr.className = "filtered-out";
      const td = el("td");
      td.appendChild(nodeLink(j));
      tr.appendChild(td);
      const kd = el("td");
      kd.appendChild(el("span", { class: "kind-" + eKind[e] }, KIND_NAMES[eKind[e]] || String(eKind[e])));
      tr.appendChild(kd);
      edgeCells(tr, e);
      frag.appendChild(tr);
    }
    body.appendChild(frag);
  }
  function fillGatingTable(i, edgeIds) {
    const body = cardTables.gating.tBodies[0];
    clear(body);
    const frag = document.createDocumentFragment();
    for (const e of edgeIds.slice().sort(byStrength)) {
      const s = eSrc[e], t = eTgt[e], m = eMod[e];
      const roles = [];
      if (m === i) roles.push("modulator");
      if (s === i) roles.push("source");
      if (t === i) roles.push("target");
      const other = t !== i ? t : s;            // the node at the other end: the target, or the source if i is the target
      const attrs = { "data-edge": String(e), "data-role": roles.join("/"),
        "data-site": siteName[nSite[other]], "data-feature": String(nFeat[other]), "data-weight": String(eW[e]),
        "data-source-site": siteName[nSite[s]], "data-source": String(nFeat[s]),
        "data-target-site": siteName[nSite[t]], "data-target": String(nFeat[t]) };
      if (m >= 0) { attrs["data-modulator-site"] = siteName[nSite[m]]; attrs["data-modulator"] = String(nFeat[m]); }
      const tr = el("tr", attrs);
      if (!pass[e]) tr.className = "filtered-out";
      const td = el("td");
      const parts = [];
      if (m >= 0 && m !== i) parts.push(["mod", m]);
      if (s !== i) parts.push(["src", s]);
      if (t !== i) parts.push(["tgt", t]);
      parts.forEach(([label, j], k) => {
        if (k) td.appendChild(document.createTextNode(" "));
        td.appendChild(nodeLink(j, label));
      });
      tr.appendChild(td);
      tr.appendChild(el("td", null, roles.join("/")));
      edgeCells(tr, e);
      frag.appendChild(tr);
    }
    body.appendChild(frag);
  }
  function markCardRows() {
    for (const t of [cardTables.in, cardTables.out, cardTables.gating]) {
      for (const tr of t.tBodies[0].rows) tr.classList.toggle("filtered-out", !pass[+tr.getAttribute("data-edge")]);
    }
  }
  function cardField(name, i) {
    const arr = CARDS[name];
    return Array.isArray(arr) && i < arr.length ? arr[i] : null;
  }
  function renderHistogram(box, h) {
    clear(box);
    if (!h || !Array.isArray(h.counts) || !h.counts.length) { box.appendChild(el("p", { class: "muted" }, "No histogram for this feature.")); return; }
    const W = 370, H = 96, pl = 34, pr = 6, pt = 6, pb = 20;
    const counts = h.counts, edges = h.edges || [];
    const maxC = Math.max.apply(null, counts) || 1;
    const svg = svgEl("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "activation histogram" });
    const bw = (W - pl - pr) / counts.length;
    counts.forEach((c, k) => {
      const h2 = c > 0 ? Math.max(1, (c / maxC) * (H - pt - pb)) : 0;
      const r = svgEl("rect", { x: (pl + k * bw).toFixed(2), y: (H - pb - h2).toFixed(2), width: Math.max(0.5, bw - 0.6).toFixed(2),
        height: h2.toFixed(2), fill: "#64748b" });
      const title = svgEl("title");
      title.textContent = fmt3(edges[k]) + " – " + fmt3(edges[k + 1]) + ": " + c;
      r.appendChild(title);
      svg.appendChild(r);
    });
    svg.appendChild(svgEl("line", { x1: pl, x2: W - pr, y1: H - pb + 0.5, y2: H - pb + 0.5, stroke: "#94a3b8" }));
    const txt = (x, y, s, anchor) => {
      const t = svgEl("text", { x: x, y: y, "font-size": 10, fill: "#4b5563", "text-anchor": anchor });
      t.textContent = s;
      svg.appendChild(t);
    };
    txt(pl, H - 6, fmt3(edges[0]), "start");
    txt(W - pr, H - 6, fmt3(edges[edges.length - 1]), "end");
    txt((pl + W - pr) / 2, H - 6, "activation (log bins)", "middle");
    txt(pl - 4, pt + 8, String(maxC), "end");
    txt(pl - 4, H - pb, "0", "end");
    box.appendChild(svg);
  }
  function tokenSpan(id, tag) {
    const s = el(tag || "span", { class: "tok" });
    s.textContent = visibleText(tokenText(id));
    return s;
  }
  function renderContexts(box, contexts) {
    clear(box);
    if (!Array.isArray(contexts) || !contexts.length) {
      box.appendChild(el("p", { class: "muted" }, "No top contexts for this feature."));
      return false;
    }
    for (const c of contexts) {
      const row = el("div", { class: "ctx" });
      row.appendChild(el("span", { class: "act" }, fmt3(c.activation)));
      if (!Array.isArray(c.tokens)) {            // a text snippet (no atlas): shown as is, nothing marked
        row.appendChild(el("span", { class: "tok" }, c.text == null ? "" : String(c.text).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5")));
        box.appendChild(row);
        continue;
      }
      const toks = c.tokens;
      for (let k = 0; k < toks.length; k++) {
        if (toks[k] === -1 || toks[k] == null) continue;
        if (k === c.at) {
          const m = tokenSpan(toks[k], "mark");
          m.title = "activation " + fmt3(c.activation);
          row.appendChild(m);
        } else row.appendChild(tokenSpan(toks[k]));
      }
      box.appendChild(row);
    }
    return true;
  }
  function renderLogits(list, pairs) {
    clear(list);
    if (!Array.isArray(pairs) || !pairs.length) { list.appendChild(el("li", { class: "muted" }, "—")); return; }
    for (const [id, v] of pairs) {
      const li = el("li");
      li.appendChild(el("span", { class: "t" }, visibleText(tokenText(id))));
      li.appendChild(el("span", { class: "v" }, fmt3(v)));
      list.appendChild(li);
    }
  }
  function renderCard() {
    const i = selectedNode;
    const title = $("card-title");
    if (i < 0) {
      title.textContent = "No feature selected";
      $("card-hint").hidden = false;
      $("card-body").hidden = true;
      for (const t of Object.values(cardTables)) clear(t.tBodies[0]);
      return;
    }
    title.textContent = nLabel[i] ? nodeKey(i) + " \u2014 " + nLabel[i] : nodeKey(i);
    $("card-hint").hidden = true;
    $("card-body").hidden = false;
    const meta = $("card-meta");
    clear(meta);
    meta.appendChild(el("span", null, "layer " + siteLayer[nSite[i]]));
    meta.appendChild(document.createTextNode(" "));
    meta.appendChild(el("span", null, "firing rate " + fmtRate(nRate[i])));
    meta.appendChild(document.createTextNode(" "));
    meta.appendChild(el("span", null, "degree " + nDeg[i]));
    const np = SITES[nSite[i]] && SITES[nSite[i]].neuronpedia;
    if (typeof np === "string" && np) {           // a link, not a fetch: the page stays offline
      meta.appendChild(document.createTextNode(" "));
      const a = el("a", { id: "card-neuronpedia", href: "https://neuronpedia.org/" + np + "/" + nFeat[i],
        target: "_blank", rel: "noopener" }, "Neuronpedia " + np + "/" + nFeat[i]);
      meta.appendChild(a);
    }
    const lv = cardField("levels", i);
    if (Array.isArray(lv) && lv.length === 3) {
      meta.appendChild(document.createTextNode(" "));
      meta.appendChild(el("span", { title: "10th, 50th and 90th percentiles of its non-zero activations (the range edge slopes are measured in)" },
        "activation p10/p50/p90 " + lv.map(fmt3).join(" / ")));
    }
    renderHistogram($("card-hist"), cardField("histogram", i));
    const hasCtx = renderContexts($("card-contexts"), cardField("contexts", i));
    renderLogits($("card-logit-top"), cardField("logit_top", i));
    renderLogits($("card-logit-bottom"), cardField("logit_bottom", i));
    const ins = edgesOf(inStart, inList, i), outs = edgesOf(outStart, outList, i), gates = edgesOf(gStart, gList, i);
    fillEdgeTable(cardTables.in, ins, (e) => eSrc[e]);
    fillEdgeTable(cardTables.out, outs, (e) => eTgt[e]);
    fillGatingTable(i, gates);
    $("card-in-count").textContent = "(" + ins.length + ")";
    $("card-out-count").textContent = "(" + outs.length + ")";
    $("card-gating-count").textContent = "(" + gates.length + ")";
    const notes = $("card-notes");
    clear(notes);
    const hasAny = hasCtx || cardField("histogram", i) || cardField("logit_top", i);
    if (!hasAny) {
      notes.appendChild(el("p", null, "This feature has no card data (contexts, histogram, logit lens)."));
      for (const n of NOTES) notes.appendChild(el("p", null, String(n)));
    }
  }
  function onTableClick(ev) {
    const b = ev.target.closest("button.link[data-node]");
    if (b) select(+b.getAttribute("data-node"));
  }
  for (const t of Object.values(cardTables)) { edgeHead(t, "node", t === cardTables.gating ? "role" : "kind"); t.addEventListener("click", onTableClick); }
  $("steer-table").addEventListener("click", onTableClick);

  // ============================================================ selection
  function resolveFeature(siteText, feat) {
    let s = siteName.indexOf(siteText);
    if (s < 0) { const hits = matchSites(siteText); if (hits.length === 1) s = hits[0]; }
    if (s < 0) return -1;
    const i = keyToNode.get(siteName[s] + "#" + feat);
    return i == null ? -1 : i;
  }
  function parseFeatureSpec(spec) {
    const m = /^\s*(.*?)\s*[#:]\s*(-?\d+)\s*$/.exec(spec);
    if (!m) return null;
    // the site is everything before the LAST separator
    const last = Math.max(spec.lastIndexOf("#"), spec.lastIndexOf(":"));
    return { site: spec.slice(0, last).trim(), feature: Number(spec.slice(last + 1).trim()) };
  }
  function sitesList() {
    const shown = siteName.slice(0, 12).join(", ");
    return siteName.length > 12 ? shown + ", \u2026 (" + siteName.length + " sites)" : shown;
  }
  function select(i, opts) {
    opts = opts || {};
    if (typeof i === "string") {
      const spec = parseFeatureSpec(i);
      const j = spec ? resolveFeature(spec.site, spec.feature) : -1;
      if (j < 0) {
        showError("feature " + (spec ? spec.site + "#" + spec.feature : i) + " is not in this graph (sites: " + sitesList() + ")");
        return -1;
      }
      i = j;
    }
    i = typeof i === "number" && i >= 0 && i < N ? Math.floor(i) : -1;
    selectedNode = i;
    updateEmphasis();
    renderCard();
    updateSteerTarget();
    if (!opts.keepHash) writeHash();
    if (i >= 0) $("sec-card").open = true;
    draw(false);
    return i;
  }

  // ============================================================ search
  let ctxText = null, ctxLower = null;
  function buildContextText() {
    ctxText = new Array(N).fill("");
    ctxLower = new Array(N).fill("");
    const all = CARDS.contexts;
    if (!Array.isArray(all)) return;
    for (let i = 0; i < N && i < all.length; i++) {
      const list = all[i];
      if (!Array.isArray(list)) continue;
      const parts = [];
      for (const c of list) {
        if (!c) continue;
        if (!Array.isArray(c.tokens)) { parts.push(c.text == null ? "" : String(c.text)); continue; }
        let s = "";
        for (const id of c.tokens) if (id !== -1 && id != null) s += tokenText(id);
        parts.push(s);
      }
      ctxText[i] = parts.join(" \u2016 ");
      ctxLower[i] = ctxText[i].toLowerCase();
    }
  }
  function matchSites(s) {
    s = s.trim();
    if (!s) return siteName.map((_, k) => k);
    let hits = siteName.map((n, k) => (n === s ? k : -1)).filter((k) => k >= 0);
    if (hits.length) return hits;
    const low = s.toLowerCase();
    const num = /^(?:l|layer\s*)?(\d+)$/i.exec(s);
    if (num) hits = siteLayer.map((l, k) => (l === Number(num[1]) ? k : -1)).filter((k) => k >= 0);
    if (hits.length) return hits;
    hits = siteName.map((n, k) => (n.toLowerCase().startsWith(low) ? k : -1)).filter((k) => k >= 0);
    if (hits.length) return hits;
    return siteName.map((n, k) => (n.toLowerCase().includes(low) ? k : -1)).filter((k) => k >= 0);
  }
  function searchNodes(q) {
    q = q.trim();
    const out = [], seen = new Set();
    const push = (i, snip) => { if (!seen.has(i) && out.length < 50) { seen.add(i); out.push([i, snip || ""]); } };
    if (!q) return out;
    const spec = /[#:]\s*\d+\s*$/.test(q) ? parseFeatureSpec(q) : null;
    if (spec) {
      for (const s of matchSites(spec.site)) {
        const i = keyToNode.get(siteName[s] + "#" + spec.feature);
        if (i != null) push(i);
      }
      if (out.length) return out;
    }
    if (/^\d+$/.test(q)) {
      for (let s = 0; s < S; s++) { const i = keyToNode.get(siteName[s] + "#" + q); if (i != null) push(i); }
    }
    const word = q.toLowerCase();
    for (let i = 0; i < N && out.length < 50; i++) {
      const l = nLabel[i];
      if (l && String(l).toLowerCase().includes(word)) push(i);
    }
    if (out.length < 50) {
      if (!ctxLower) buildContextText();
      for (let i = 0; i < N && out.length < 50; i++) {
        const k = ctxLower[i].indexOf(word);
        if (k >= 0) push(i, ctxText[i].slice(Math.max(0, k - 18), k + word.length + 18));
      }
    }
    return out;
  }
  const searchBox = $("search"), resultsBox = $("search-results");
  let results = [];
  function showResults() {
    results = searchNodes(searchBox.value);
    clear(resultsBox);
    if (!searchBox.value.trim()) { resultsBox.hidden = true; return; }
    if (!results.length) {
      resultsBox.appendChild(el("li", { class: "none" }, "no feature matches"));
    }
    for (const [i, snip] of results) {
      const li = el("li", { "data-node": String(i), role: "option", title: nodeText(i) }, nodeText(i));
      if (snip) li.appendChild(el("span", { class: "snip" }, "\u2026" + visibleText(snip) + "\u2026"));
      resultsBox.appendChild(li);
    }
    resultsBox.hidden = false;
  }
  searchBox.addEventListener("input", showResults);
  searchBox.addEventListener("focus", () => { if (searchBox.value.trim()) showResults(); });
  searchBox.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      showResults();
      if (results.length) { resultsBox.hidden = true; select(results[0][0]); }
    } else if (ev.key === "Escape") resultsBox.hidden = true;
  });
  resultsBox.addEventListener("mousedown", (ev) => ev.preventDefault());   // keep focus; click picks
  resultsBox.addEventListener("click", (ev) => {
    const li = ev.target.closest("li[data-node]");
    if (!li) return;
    resultsBox.hidden = true;
    select(+li.getAttribute("data-node"));
  });
  searchBox.addEventListener("blur", () => setTimeout(() => { resultsBox.hidden = true; }, 150));
  document.addEventListener("mousedown", (ev) => {
    if (!resultsBox.hidden && !ev.target.closest(".search-wrap")) resultsBox.hidden = true;
  });

  // ============================================================ behaviour
  const behaviorSelect = $("behavior-select");
  function setCircuit(k) {
    const c = k >= 0 && k < CIRCUITS.length ? CIRCUITS[k] : null;
    circuit = c ? { index: k, nodes: new Set((c.nodes || []).filter((i) => i >= 0 && i < N)),
      seeds: new Set((c.seeds || []).filter((i) => i >= 0 && i < N)), edges: new Set((c.edges || []).filter((e) => e >= 0 && e < E)) } : null;
    behaviorSelect.value = c ? String(k) : "";
    updateEmphasis();
    renderBehavior();
    draw(false);
  }
  function renderBehavior() {
    const table = $("behavior-numbers"), summary = $("behavior-summary");
    clear(table);
    summary.textContent = "";
    if (!circuit) {
      $("behavior-empty").textContent = CIRCUITS.length ? "Choose a behaviour in the header to highlight its subgraph."
        : "This graph has no behaviour subgraphs.";
      return;
    }
    const c = CIRCUITS[circuit.index];
    $("behavior-empty").textContent = c.name + ": " + circuit.nodes.size + " nodes (" + circuit.seeds.size + " seeds, ringed), "
      + circuit.edges.size + " edges";
    summary.textContent = c.summary == null ? "" : String(c.summary);
    const numbers = c.numbers || {};
    const head = el("tr");
    head.appendChild(el("th", null, "name")); head.appendChild(el("th", null, "value"));
    table.appendChild(head);
    for (const name of Object.keys(numbers)) {
      const v = numbers[name];
      const tr = el("tr", { "data-name": name, "data-value": String(v) });
      tr.appendChild(el("th", null, name));
      tr.appendChild(el("td", null, typeof v === "number" ? fmt3(v) : v == null ? "—" : String(v)));
      table.appendChild(tr);
    }
    $("sec-behavior").open = true;
  }
  function initBehavior() {
    if (!CIRCUITS.length) {
      behaviorSelect.disabled = true;
      behaviorSelect.title = "this graph has no behaviour subgraphs";
    }
    CIRCUITS.forEach((c, k) => behaviorSelect.appendChild(el("option", { value: String(k) }, String(c.name))));
    behaviorSelect.addEventListener("change", () => setCircuit(behaviorSelect.value === "" ? -1 : +behaviorSelect.value));
    renderBehavior();
  }

  // ============================================================ compare
  function legendLine(color, dashed) {
    const s = svgEl("svg", { width: 26, height: 8 });
    s.appendChild(svgEl("line", { x1: 1, x2: 25, y1: 4, y2: 4, stroke: color, "stroke-width": 2.5,
      "stroke-dasharray": dashed ? "5 3" : "none" }));
    return s;
  }
  function initLegend() {
    const box = $("legend");
    const items = COMPARE
      ? [[COLOR.same, "same"], [COLOR.gained, "gained (only in B)"], [COLOR.lost, "lost (only in A)"], [COLOR.flipped, "sign flipped"], ["#6b7280", "gating (dashed)", true]]
      : [[COLOR.exc, "excitatory"], [COLOR.inh, "inhibitory"], [COLOR.gate, "gating (modulator \u2192 midpoint)", true]];
    for (const [color, label, dashed] of items) {
      const d = el("div", { class: "item" });
      d.appendChild(legendLine(color, dashed));
      d.appendChild(el("span", null, label));
      box.appendChild(d);
    }
  }
  function initCompare() {
    if (!COMPARE) return;
    $("status-filters").hidden = false;
    $("sec-compare").hidden = false;
    $("sec-compare").open = true;
    const box = $("compare-summary");
    box.appendChild(el("p", null, "A: " + COMPARE.a + " \u2192 B: " + COMPARE.b));
    const counts = COMPARE.counts || {};
    const p = el("p", { class: "counts" });
    STATUS_NAMES.forEach((name, k) => {
      p.appendChild(el("span", { class: "s-" + name, "data-status": name }, name + " " + (counts[name] != null ? counts[name] : "?")));
    });
    box.appendChild(p);
    for (const n of COMPARE.notes || []) box.appendChild(el("p", { class: "muted" }, String(n)));
  }

  // ============================================================ steering (live server only)
  function updateSteerTarget() {
    if (!LIVE) return;
    $("steer-target").textContent = selectedNode >= 0 ? "Clamp " + nodeText(selectedNode) + " and compare the graph's prediction with the model."
      : "Select a feature to steer.";
    $("steer-run").disabled = selectedNode < 0;
    const lv = selectedNode >= 0 ? cardField("levels", selectedNode) : null;
    if (Array.isArray(lv) && lv.length === 3 && lv[2] != null) {
      $("steer-value").value = String(+lv[2].toPrecision(3));     // the 90th percentile: the top of the measured range
      $("steer-target").textContent += " Its non-zero activations run " + fmt3(lv[0]) + " to " + fmt3(lv[2]) +
        " (10th to 90th percentile); values far outside extrapolate the graph's slopes.";
    }
  }
  function steerStatus(msg, bad) {
    const s = $("steer-status");
    s.textContent = msg;
    s.classList.toggle("bad", !!bad);
  }
  function showSteer(res) {
    const fit = $("steer-fit");
    clear(fit);
    const f = res.fit || {};
    for (const [label, v] of [["R\u00b2", f.r2], ["linear r\u00b2", f.r2_linear], ["Spearman", f.spearman]]) {
      fit.appendChild(el("span", null, label + " " + fmt3(v)));
    }
    fit.appendChild(el("span", null, "n " + (f.n == null ? "—" : f.n)));
    $("steer-clean").textContent = res.clean_text == null ? "" : String(res.clean_text);
    $("steer-steered").textContent = res.steered_text == null ? "" : String(res.steered_text);
    const body = $("steer-table").tBodies[0];
    clear(body);
    const obs = new Map();
    for (const r of res.rows || []) {
      const tr = el("tr", { "data-site": String(r.site), "data-feature": String(r.feature),
        "data-predicted": String(r.predicted), "data-observed": String(r.observed) });
      const td = el("td");
      const node = typeof r.node === "number" && r.node >= 0 && r.node < N ? r.node : -1;
      if (node >= 0) td.appendChild(nodeLink(node));
      else td.appendChild(el("span", { class: "muted", title: "not a node of this graph" }, r.site + "#" + r.feature));
      tr.appendChild(td);
      tr.appendChild(el("td", { class: "num" }, fmt3(r.predicted)));
      tr.appendChild(el("td", { class: "num" }, fmt3(r.observed)));
      body.appendChild(tr);
      if (node >= 0 && typeof r.observed === "number" && isFinite(r.observed)) obs.set(node, r.observed);
    }
    steerObs = obs;
    steerSource = typeof res.node === "number" ? res.node : selectedNode;
    updateEmphasis();
    draw(false);
  }
  async function runSteer() {
    if (selectedNode < 0) { steerStatus("Select a feature first.", true); return; }
    const body = { site: siteName[nSite[selectedNode]], feature: nFeat[selectedNode], value: num("steer-value", 10),
      prompt: $("steer-prompt").value, max_new_tokens: Math.max(0, Math.round(num("steer-tokens", 16))) };
    const btn = $("steer-run");
    btn.disabled = true;
    steerStatus("running: clamping " + body.site + "#" + body.feature + " to " + body.value + " \u2026");
    const data = await postLive("api/steer", body, "steering");
    btn.disabled = selectedNode < 0;
    if (!data) return;
    showSteer(data);
    steerStatus("done: " + (data.rows || []).length + " later features changed (" + (data.tokens != null ? data.tokens + " tokens" : "") + ")");
  }
  // POST a JSON body to the live server: the answer, or null after showing what failed
  async function postLive(path, body, what) {
    let msg;
    try {
      const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      let data = null;
      try { data = await r.json(); } catch (err) { data = null; }
      if (r.ok && data && !data.error) return data;
      msg = what + " failed: " + ((data && data.error) || ("HTTP " + r.status + " " + r.statusText));
    } catch (err) {
      msg = what + " failed: " + err.message;
    }
    steerStatus(msg, true);
    showError(msg);
    return null;
  }
  async function exportAttribution() {
    steerStatus("building the attribution graph of the prompt \u2026");
    const data = await postLive("api/attribution", { prompt: $("steer-prompt").value }, "attribution export");
    if (!data) return;
    download(new Blob([JSON.stringify(data)], { type: "application/json" }), "jfig-attribution.json");
    steerStatus("attribution graph: " + data.nodes.length + " nodes, " + data.links.length + " links (circuit-tracer / Neuronpedia format)");
  }
  function initSteer() {
    if (!LIVE) {
      const note = $("steer-note");
      note.textContent = "The steering simulator needs the live server: run `jfig serve` on this graph and open the page it serves.";
      note.hidden = false;
      return;
    }
    $("steer-live").hidden = false;
    $("sec-steer").open = true;
    $("steer-run").addEventListener("click", runSteer);
    $("steer-attribution").addEventListener("click", exportAttribution);
    $("steer-clear").addEventListener("click", () => { steerObs = null; steerSource = -1; updateEmphasis(); draw(false); });
    updateSteerTarget();
  }

  // ============================================================ exports
  function download(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name });
    a.style.display = "none";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  // edges passing the filters with at least one endpoint (source or target) inside the viewport, strongest first
  function edgesInView() {
    project();
    const out = [];
    for (let k = 0; k < E; k++) {
      const e = order[k];
      if (pass[e] && (inViewport(eSrc[e]) || inViewport(eTgt[e]))) out.push(e);
    }
    return out;
  }
  function nodesInView() {
    const out = [];
    for (let i = 0; i < N; i++) if (inViewport(i)) out.push(i);
    return out;
  }
  function viewDoc() {
    const es = edgesInView(), ns = nodesInView();
    const nodeRow = (i) => ({ site: siteName[nSite[i]], feature: nFeat[i], label: nLabel[i] == null ? null : nLabel[i] });
    const edgeRow = (e) => {
      const m = eMod[e];
      const row = { source_site: siteName[nSite[eSrc[e]]], source: nFeat[eSrc[e]], target_site: siteName[nSite[eTgt[e]]],
        target: nFeat[eTgt[e]], kind: KIND_NAMES[eKind[e]], weight: eW[e], p_value: isNaN(eP[e]) ? null : eP[e],
        n: eN[e] == null ? null : eN[e], estimator: estimatorName(e),
        modulator_site: m >= 0 ? siteName[nSite[m]] : null, modulator: m >= 0 ? nFeat[m] : null };
      if (COMPARE) { row.status = STATUS_NAMES[eStatus[e]]; row.weight_b = eWB[e] == null ? null : eWB[e]; }
      return row;
    };
    return { title: P.title == null ? null : P.title, nodes: ns.map(nodeRow), edges: es.map(edgeRow) };
  }
  function exportJSON() {
    const doc = viewDoc();
    download(new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" }), "jfig-view.json");
    return doc;
  }
  function xmlEscape(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function svgText() {
    const SVG_MAX = 20000;
    const all = edgesInView();
    const es = all.slice(0, SVG_MAX).reverse();          // strongest drawn last
    const W = V.W, H = V.H, f = (x) => (Math.round(x * 100) / 100).toString();
    const out = [];
    out.push('<?xml version="1.0" encoding="UTF-8"?>');
    out.push('<svg xmlns="http://www.w3.org/2000/svg" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H + '" font-family="sans-serif">');
    out.push("<title>" + xmlEscape(P.title || "jfig graph") + "<\/title>");
    const note = all.length > SVG_MAX ? "showing the strongest " + SVG_MAX + " of " + all.length + " edges in view"
      : all.length + " edges in view";
    out.push("<desc>" + xmlEscape(note) + "<\/desc>");
    out.push('<rect width="100%" height="100%" fill="#ffffff"/>');
    out.push('<g fill="none" stroke-linecap="round">');
    for (const e of es) {
      const st = groupStyle(eGroup[e]);
      const s = eSrc[e], t = eTgt[e];
      const attrs = ' stroke="' + PALETTE[st.c] + '" stroke-width="' + BW[st.b].toFixed(2) + '" stroke-opacity="' + BA[st.b].toFixed(2) + '"'
        + (st.d ? ' stroke-dasharray="5 4"' : "");
      let d = "M" + f(sx[s]) + " " + f(sy[s]) + "L" + f(sx[t]) + " " + f(sy[t]);
      if (eKind[e] === 2 && eMod[e] >= 0) {
        const m = eMod[e];
        d += "M" + f(sx[m]) + " " + f(sy[m]) + "L" + f((sx[s] + sx[t]) / 2) + " " + f((sy[s] + sy[t]) / 2);
      }
      out.push('<path d="' + d + '"' + attrs + "/>");
    }
    out.push("<\/g>");
    out.push('<g fill="' + COLOR.node + '">');
    for (const i of nodesInView()) {
      out.push('<circle cx="' + f(sx[i]) + '" cy="' + f(sy[i]) + '" r="' + f(nr[i]) + '"><title>' + xmlEscape(nodeText(i)) + "<\/title><\/circle>");
    }
    out.push("<\/g>");
    out.push('<g font-size="12" fill="#374151" text-anchor="middle">');
    for (let c = 0; c < S; c++) {
      const x = V.ax * c + V.bx;
      if (x >= 0 && x <= W) out.push('<text x="' + f(x) + '" y="16">' + xmlEscape(siteName[c]) + "<\/text>");
    }
    out.push("<\/g>");
    out.push('<text x="8" y="' + (H - 8) + '" font-size="11" fill="#6b7280">' + xmlEscape(note) + "<\/text>");
    out.push("<\/svg>");
    return out.join("\n");
  }
  $("export-png").addEventListener("click", () => {
    draw(false);
    canvas.toBlob((blob) => { if (blob) download(blob, "jfig-view.png"); else showError("could not export the canvas as PNG"); }, "image/png");
  });
  $("export-svg").addEventListener("click", () => download(new Blob([svgText()], { type: "image/svg+xml" }), "jfig-view.svg"));
  $("export-json").addEventListener("click", () => { exportJSON(); });

  // ============================================================ URL (#feature=site%23id, ?feature=site:id)
  function featureFromUrl() {
    const h = location.hash.replace(/^#/, "");
    const m = /(?:^|&)feature=(.*)$/.exec(h);
    let raw = null;
    if (m) raw = m[1].split("&")[0];
    else {
      try { raw = new URLSearchParams(location.search).get("feature"); } catch (err) { raw = null; }
    }
    if (raw == null || raw === "") return null;
    try { return decodeURIComponent(raw.replace(/\+/g, " ")); } catch (err) { return raw; }
  }
  let writingHash = false;
  function writeHash() {
    const target = selectedNode >= 0 ? "#feature=" + encodeURIComponent(nodeKey(selectedNode)) : "";
    if (location.hash === target || (!target && !location.hash)) return;
    try {
      history.replaceState(null, "", target || location.pathname + location.search);
    } catch (err) {
      writingHash = true;
      location.hash = target;
      setTimeout(() => { writingHash = false; }, 0);
    }
  }
  function selectFromUrl() {
    const spec = featureFromUrl();
    if (spec == null) return;
    const i = select(spec, { keepHash: true });
    if (i >= 0) hideError();
  }
  window.addEventListener("hashchange", () => { if (!writingHash) selectFromUrl(); });

  // ============================================================ info
  function initInfo() {
    const box = $("info");
    const title = P.title == null ? "" : String(P.title);
    $("title").textContent = title;
    if (title) document.title = title + " \u2014 jfig explorer";
    box.appendChild(el("h2", null, title || "jfig graph"));
    const dl = el("dl");
    const facts = [["mode", P.mode || "static"], ["sites", String(S)], ["nodes", String(N)], ["edges", String(E)]];
    const meta = P.meta || {};
    for (const k of Object.keys(meta)) {
      const v = meta[k];
      facts.push([k, v != null && typeof v === "object" ? JSON.stringify(v) : String(v)]);
    }
    for (const [k, v] of facts) { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", null, v)); }
    box.appendChild(dl);
    if (NOTES.length) {
      box.appendChild(el("h3", null, "Notes"));
      const ul = el("ul");
      for (const n of NOTES) ul.appendChild(el("li", null, String(n)));
      box.appendChild(ul);
    }
    box.appendChild(el("p", { class: "muted" }, "Drag to pan, wheel to zoom, click a node to open its card, Esc to clear."));
  }

  // ============================================================ test API
  const api = {
    ready: false,
    renders: 0,                            // draws so far (full and light)
    timings: { parseMs: parseMs, firstRenderMs: null },
    lastRender: lastRender,
    visibleEdgeCount: () => passCount,
    select: (i) => select(i),
    selected: () => selectedNode,
    nodeScreenPosition(i) {
      if (typeof i === "string") { const j = keyToNode.get(i); i = j == null ? -1 : j; }
      if (!(i >= 0 && i < N)) return null;
      const r = canvas.getBoundingClientRect();
      return { x: r.left + V.ax * nSite[i] + V.bx, y: r.top + V.ay * nY[i] + V.by };
    },
    render: (lod) => draw(!!lod),
    zoom(factor) { zoomAt(factor, V.W / 2, V.H / 2); return draw(false); },
    pan(dx, dy) { panBy(dx, dy); return draw(false); },
    fit() { fit(); return draw(false); },
    setCircuit: (k) => setCircuit(k),
    viewJSON: () => viewDoc(),
  };
  window.jfigExplorer = api;

  // ============================================================ start
  $("error").addEventListener("click", hideError);
  for (const id of ["filter-excitatory", "filter-inhibitory", "filter-gating", "filter-same", "filter-gained", "filter-lost",
    "filter-flipped", "filter-weight", "filter-p", "filter-layer-min", "filter-layer-max"]) {
    $(id).addEventListener("input", onFilterChange);
    $(id).addEventListener("change", onFilterChange);
  }
  if (S) { $("filter-layer-min").value = String(layerMin); $("filter-layer-max").value = String(layerMax); }
  initLegend();
  initCompare();
  initBehavior();
  initSteer();
  initInfo();
  applyFilters();
  resizeCanvas();
  fit();
  if (!N) showError("this graph has no nodes");
  selectFromUrl();
  if (selectedNode < 0) draw(false);
  api.timings.firstRenderMs = performance.now();
  api.ready = true;
})();
