// Small line charts as inline SVG, drawn from the console's /api/series answer. No library: a few polylines, two
// axis labels and a legend are all the overview needs, and this keeps the console one download with no licence to
// track. Colours come from the stylesheet (classes s0..s7), so the Content-Security-Policy needs no inline style.

const SVG = "http://www.w3.org/2000/svg";
const W = 640;
const H = 200;
const PAD = { left: 52, right: 12, top: 12, bottom: 26 };

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * power) return m * power;
  return 10 * power;
}

export function formatNumber(value, unit) {
  if (value === null || value === undefined) return "–";
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)}${unit ? " " + unit : ""}`;
}

function clock(seconds) {
  return new Date(seconds * 1000).toISOString().slice(11, 19);
}

// One chart: `series` maps a name to values (numbers, or null where there is no data), one per `step` seconds from
// `start`. Returns a <figure> holding the SVG and a legend with each series' latest and peak value.
export function lineChart({ id, title, series, start, step, unit }) {
  const names = Object.keys(series);
  const points = names.length ? series[names[0]].length : 0;
  let peak = 0;
  for (const name of names) for (const v of series[name]) if (v !== null && v > peak) peak = v;
  const top = niceMax(peak);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (points > 1 ? (i / (points - 1)) * plotW : 0);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.id = id;
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption);

  const summary = names.length
    ? names.map((n) => `${n} peak ${formatNumber(Math.max(0, ...series[n].filter((v) => v !== null)), unit)}`).join(", ")
    : "no data in this window yet";
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${summary}` });
  svg.append(el("line", { class: "axis", x1: PAD.left, y1: PAD.top + plotH, x2: W - PAD.right, y2: PAD.top + plotH }));
  svg.append(el("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + plotH }));
  svg.append(el("line", { class: "grid", x1: PAD.left, y1: PAD.top, x2: W - PAD.right, y2: PAD.top }));
  svg.append(el("text", { class: "tick", x: PAD.left - 6, y: PAD.top + 4, "text-anchor": "end" }, formatNumber(top, "")));
  svg.append(el("text", { class: "tick", x: PAD.left - 6, y: PAD.top + plotH, "text-anchor": "end" }, "0"));
  svg.append(el("text", { class: "tick", x: PAD.left, y: H - 6 }, clock(start)));
  svg.append(el("text", { class: "tick", x: W - PAD.right, y: H - 6, "text-anchor": "end" }, clock(start + points * step) + " UTC"));
  if (!names.length) {
    svg.append(el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data in this window yet"));
  }
  names.forEach((name, index) => {
    const values = series[name];
    let d = "";
    values.forEach((v, i) => {
      if (v === null) return;
      const joined = i > 0 && values[i - 1] !== null;
      d += `${joined ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      // A value with no neighbour would be a zero-length line: mark it with a dot so it can be seen.
      const alone = !joined && (i + 1 >= values.length || values[i + 1] === null);
      if (alone) svg.append(el("circle", { class: `dot s${index % 8}`, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 3 }));
    });
    if (d) svg.append(el("path", { class: `line s${index % 8}`, d, "data-series": name }));
  });
  figure.append(svg);

  const legend = document.createElement("ul");
  legend.className = "legend";
  names.forEach((name, index) => {
    const values = series[name].filter((v) => v !== null);
    const latest = values.length ? values[values.length - 1] : null;
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch s${index % 8}`;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, `${name}: ${formatNumber(latest, unit)} now, peak ${formatNumber(Math.max(0, ...values), unit)}`);
    legend.append(item);
  });
  figure.append(legend);
  return figure;
}
