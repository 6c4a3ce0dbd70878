// SkipClick annotation page: the server encodes the image once and answers each click.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { session: null, width: 0, height: 0, clicks: [], name: "image.png" };

function message(text, isError) {
  $("message").textContent = text || "";
  $("message").className = isError ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const body = isJson ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function drawMarks() {
  const canvas = $("marks"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const radius = Math.max(3, Math.round(Math.max(state.width, state.height) / 120));
  for (const c of state.clicks) {
    ctx.beginPath();
    ctx.arc(c.col + 0.5, c.row + 0.5, radius, 0, 2 * Math.PI);
    ctx.fillStyle = c.positive ? "#2ecc40" : "#ff4136";
    ctx.fill();
    ctx.lineWidth = Math.max(1, radius / 3);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function show(view, roundTripMs) {
  state.clicks = view.clicks;
  const overlay = $("overlay"), ctx = overlay.getContext("2d");
  const img = new Image();
  const drawn = new Promise((resolve) => { img.onload = resolve; });
  img.src = view.overlay;
  drawn.then(() => {
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    ctx.drawImage(img, 0, 0);
    overlay.dataset.version = String(Number(overlay.dataset.version || 0) + 1);
  });
  drawMarks();
  $("undo").disabled = $("reset").disabled = $("next").disabled = view.clicks.length === 0;
  $("download").disabled = $("coco").disabled = view.clicks.length === 0 && view.objects === 0;
  if (roundTripMs !== undefined) {
    $("latency").textContent =
      `${view.action}: ${view.latency_ms.toFixed(1)} ms model, ${roundTripMs.toFixed(0)} ms round trip`;
  }
  $("status").textContent = `${state.width}x${state.height} · object ${view.objects + 1} · ` +
    `${view.clicks.length} click(s) · ${view.current_area} px · finished objects: ${view.objects}`;
  return drawn;
}

async function openImage(blob, name) {
  message(`encoding ${name} ...`);
  try {
    const t0 = performance.now();
    const view = await api("/api/image", { method: "POST", body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" } });
    const bitmap = await createImageBitmap(blob);
    state.session = view.session; state.width = view.width; state.height = view.height;
    state.name = name === "example" ? "example.png" : name;
    for (const id of ["image", "overlay", "marks"]) {
      $(id).width = view.width; $(id).height = view.height;
    }
    $("image").getContext("2d").drawImage(bitmap, 0, 0);
    const scale = Math.min((window.innerWidth - 32) / view.width, (window.innerHeight - 140) / view.height);
    $("image").style.width = `${Math.round(view.width * scale)}px`;
    $("stage").hidden = false; $("hint").hidden = true;
    await show(view);
    $("latency").textContent = `encode: ${view.encode_ms.toFixed(1)} ms model, ` +
      `${(performance.now() - t0).toFixed(0)} ms round trip`;
    message(`${name}: ${view.width}x${view.height}`);
    document.body.dataset.session = view.session;
  } catch (e) {
    message(`Could not open ${name}: ${e.message}`, true);
  }
}

async function act(name, extra) {
  if (!state.session) return;
  try {
    const t0 = performance.now();
    const view = await api(`/api/${name}`, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ session: state.session, ...extra }) });
    await show(view, performance.now() - t0);
    message("");
  } catch (e) {
    message(`${name} failed: ${e.message}`, true);
  }
}

function clickAt(event, positive) {
  event.preventDefault();
  const rect = $("marks").getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) * state.width / rect.width);
  const row = Math.floor((event.clientY - rect.top) * state.height / rect.height);
  if (row < 0 || col < 0 || row >= state.height || col >= state.width) return;
  act("click", { row, col, positive });
}

$("marks").addEventListener("click", (e) => clickAt(e, true));
$("marks").addEventListener("contextmenu", (e) => clickAt(e, false));
$("undo").onclick = () => act("undo");
$("reset").onclick = () => act("reset");
$("next").onclick = () => act("next");
$("file").onchange = (e) => { const f = e.target.files[0]; if (f) openImage(f, f.name); e.target.value = ""; };
$("example").onclick = async () => {
  const response = await fetch("/api/example");
  openImage(await response.blob(), "example");
};
function download(href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.appendChild(a); a.click(); a.remove();
}
$("download").onclick = () => download(`/api/mask?session=${encodeURIComponent(state.session)}`, "mask.png");
$("coco").onclick = () => download(`/api/coco?session=${encodeURIComponent(state.session)}` +
  `&file_name=${encodeURIComponent(state.name)}`, "annotations.json");
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragging"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("dragging");
  const f = e.dataTransfer.files[0];
  if (f) openImage(f, f.name);
});

api("/api/info").then((info) => {
  $("status").textContent = `model: ${info.model} (${info.backend}, ${info.size}x${info.size})`;
  if (info.random_weights) { $("warning").textContent = info.model; $("warning").hidden = false; }
});
