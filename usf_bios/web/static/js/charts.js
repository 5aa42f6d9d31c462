// Line charts over uPlot (vendored in /static/vendor): x is the optimizer step, one or more series,
// resized with the container.

/* global uPlot */

export const PALETTE = ["#0f766e", "#2563eb", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777"];

const AXIS = { stroke: "#5f6b7a", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e2e5ea", width: 1 } };

function axisNumber(value) {
  if (value === null) return "";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

/**
 * series: [{label, color, dash?, points?, width?}]. Returns {setData(xs, ys[]), destroy()}: ys holds one
 * array per series, aligned with xs, with null where a series has no value at that step.
 */
export function lineChart(container, { series, height = 280 }) {
  const chartHeight = () => (window.innerWidth < 600 ? Math.round(height * 0.75) : height);
  const width = () => Math.max(container.clientWidth, 240);
  const options = {
    width: width(),
    height: chartHeight(),
    scales: { x: { time: false } },
    axes: [
      { ...AXIS, label: "step", labelSize: 20, values: (u, values) => values.map((v) => (Number.isInteger(v) ? String(v) : "")) },
      { ...AXIS, size: 56, values: (u, values) => values.map(axisNumber) },
    ],
    series: [
      { label: "step" },
      ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: s.width ?? 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: s.points ?? false, size: 6, fill: s.color },
        value: (u, v) => (v === null || v === undefined ? "—" : axisNumber(v)),
      })),
    ],
    cursor: { drag: { x: true, y: false } },
    legend: { show: true },
  };
  const chart = new uPlot(options, [[], ...series.map(() => [])], container);
  let frame = null;
  const observer = new ResizeObserver(() => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => {
      if (Math.abs(chart.width - width()) > 1) chart.setSize({ width: width(), height: chartHeight() });
    });
  });
  observer.observe(container);
  return {
    setData(xs, ys) {
      chart.setData([xs, ...ys]);
    },
    destroy() {
      observer.disconnect();
      chart.destroy();
    },
  };
}
