(function(){
"use strict";
var DATA = JSON.parse(document.getElementById("kd-data").textContent);
var C = DATA.colours, P = DATA.pruned, NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent){ var e = document.createElementNS(NS, tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }
function colours(n){ return n.pruned ? P : (C[n.kind] || C.input); }
C.tap = DATA.tap;
var tip = document.getElementById("tip");
var legend = document.getElementById("legend");
[["teacher","teacher"],["student","student"],["adapter","adapter"],["loss","loss term"],["total","total loss"],
 ["input","input"],["tap","tap"]].forEach(function(p){ var s = document.createElement("span"); var c = C[p[0]];
  s.style.background = c[0]; s.style.borderColor = c[1]; s.style.color = c[2]; s.textContent = p[1]; legend.appendChild(s); });
var extra = document.createElement("span"); extra.textContent = "dashed = frozen, bold = trains, grey = pruned";
extra.style.border = "none"; legend.appendChild(extra);
var total = 0, taps = 0, tabs = document.getElementById("tabs"), host = document.getElementById("stages"), views = [];
DATA.stages.forEach(function(st, si){
  var div = document.createElement("div"); div.className = "stage"; div.dataset.stage = st.stage; host.appendChild(div);
  var b = document.createElement("button"); b.textContent = st.stage; b.title = st.title;
  b.onclick = function(){ show(si); }; tabs.appendChild(b);
  var svg = el("svg", {width: "100%", height: "100%", viewBox: "0 0 " + st.width + " " + st.height}, div);
  var defs = el("defs", {}, svg);
  var mk = el("marker", {id: "arr" + si, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7",
                         markerHeight: "7", orient: "auto-start-reverse"}, defs);
  el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#777"}, mk);
  var root = el("g", {}, svg);
  var t = el("text", {x: 12, y: 22, "font-size": 15, "font-weight": "bold"}, root); t.textContent = st.title;
  st.clusters.forEach(function(c){
    var g = el("g", {"class": "cluster"}, root);
    el("rect", {x: c.x, y: c.y, width: c.w, height: c.h, rx: 10, fill: DATA.cluster_fill[c.role],
                stroke: C[c.role][1], "stroke-width": c.frozen ? 1 : 2, "stroke-dasharray": c.frozen ? "6 4" : ""}, g);
    var lt = el("text", {x: c.x + 10, y: c.y + 16, "font-size": 12, fill: C[c.role][1]}, g); lt.textContent = c.label;
  });
  var edgeLayer = el("g", {}, root), nodeLayer = el("g", {}, root);
  var byId = {}, eds = [];
  st.edges.forEach(function(e){
    var g = el("g", {"class": "edge", "data-src": e.src, "data-dst": e.dst, "data-kind": e.kind}, edgeLayer);
    var a = {d: e.path, stroke: e.colour, "stroke-width": e.kind === "flow" ? 1 : 1.6,
             "stroke-dasharray": e.pruned ? "5 4" : ""};
    if (e.kind !== "tap_in") a["marker-end"] = "url(#arr" + si + ")";
    el("path", a, g);
    eds.push({e: e, g: g});
  });
  st.nodes.forEach(function(n){
    var isTap = n.kind === "tap", c = isTap ? DATA.tap : colours(n);
    var frozen = (n.kind === "teacher" || n.kind === "student" || n.kind === "adapter") && !n.trainable;
    var g = el("g", {"class": isTap ? "tap" : "node", "data-id": n.id, "data-kind": n.kind}, nodeLayer);
    el("rect", {x: n.x, y: n.y, width: n.w, height: n.h, fill: c[0], stroke: c[1], rx: isTap ? 3 : 6,
                "stroke-width": n.trainable ? 2.2 : 1, "stroke-dasharray": (frozen || n.pruned) ? "5 3" : ""}, g);
    var tt = el("text", {x: n.x + n.w / 2, y: n.y + (isTap ? 13 : 17), "text-anchor": "middle",
                         "font-weight": isTap ? "normal" : "bold", "font-size": isTap ? 10 : 12, fill: c[2]}, g);
    tt.textContent = n.title;
    n.lines.forEach(function(ln, i){
      var s = el("text", {x: n.x + n.w / 2, y: n.y + (isTap ? 25 : 31 + 14 * i), "text-anchor": "middle",
                          "font-size": isTap ? 9 : 10, fill: c[2]}, g); s.textContent = ln; });
    g.addEventListener("mousemove", function(ev){
      tip.style.display = "block"; tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
      tip.textContent = n.kind + " " + n.title + "\n" + n.lines.join("\n") + "\n" + JSON.stringify(n.details, null, 1);
    });
    g.addEventListener("mouseleave", function(){ tip.style.display = "none"; });
    g.addEventListener("click", function(ev){ ev.stopPropagation(); highlight(n.id); });
    byId[n.id] = g;
    if (isTap) taps += 1; else total += 1;
  });
  function reach(start, fwd){
    var seen = {}; seen[start] = 1; var todo = [start];
    while (todo.length){ var k = todo.pop();
      eds.forEach(function(x){ var a = fwd ? x.e.src : x.e.dst, b = fwd ? x.e.dst : x.e.src;
        if (a === k && !seen[b]){ seen[b] = 1; todo.push(b); } }); }
    return seen;
  }
  function highlight(id){
    var up = reach(id, false), down = reach(id, true);
    Object.keys(byId).forEach(function(k){ byId[k].classList.toggle("dim", !(up[k] || down[k])); });
    eds.forEach(function(x){ var on = (up[x.e.src] && up[x.e.dst]) || (down[x.e.src] && down[x.e.dst]);
      x.g.classList.toggle("dim", !on); x.g.classList.toggle("hl", !!on); });
  }
  svg.addEventListener("click", function(){ Object.keys(byId).forEach(function(k){ byId[k].classList.remove("dim"); });
    eds.forEach(function(x){ x.g.classList.remove("dim", "hl"); }); });
  // pan and zoom on the viewBox
  var vb = [0, 0, st.width, st.height], drag = null;
  function setVB(){ svg.setAttribute("viewBox", vb.join(" ")); }
  svg.addEventListener("wheel", function(ev){ ev.preventDefault(); var r = svg.getBoundingClientRect();
    var f = ev.deltaY > 0 ? 1.15 : 1 / 1.15, mx = vb[0] + (ev.clientX - r.left) / r.width * vb[2],
        my = vb[1] + (ev.clientY - r.top) / r.height * vb[3];
    vb = [mx - (mx - vb[0]) * f, my - (my - vb[1]) * f, vb[2] * f, vb[3] * f]; setVB(); }, {passive: false});
  svg.addEventListener("mousedown", function(ev){ drag = [ev.clientX, ev.clientY, vb[0], vb[1]]; });
  window.addEventListener("mouseup", function(){ drag = null; });
  svg.addEventListener("mousemove", function(ev){ if (!drag) return; var r = svg.getBoundingClientRect();
    vb[0] = drag[2] - (ev.clientX - drag[0]) * vb[2] / r.width; vb[1] = drag[3] - (ev.clientY - drag[1]) * vb[3] / r.height;
    setVB(); });
  views.push({div: div, button: b});
});
function show(i){ views.forEach(function(v, j){ v.div.classList.toggle("on", i === j); v.button.classList.toggle("on", i === j); }); }
show(0);
document.documentElement.setAttribute("data-rendered-nodes", String(total));
document.documentElement.setAttribute("data-rendered-taps", String(taps));
document.getElementById("kd-status").textContent = "rendered " + total + " nodes and " + taps + " taps in " +
  DATA.stages.length + " stage(s)";
})();
