// lowtune studio's page: plain JavaScript over the studio's JSON API (lowtune/studio/app.py); no build step.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (selector) => document.querySelector(selector);
const state = { schema: [], selectedRun: null, chatHistory: [], timers: {} };

async function api(path, body) {
  const options = { headers: { "Content-Type": "application/json" } };
  if (token) options.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) Object.assign(options, { method: "POST", body: JSON.stringify(body) });
  const response = await fetch(path, options);
  const answer = response.headers.get("Content-Type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(answer?.problems?.join("\n") || answer?.detail || response.statusText);
  return answer;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// --- pages ----------------------------------------------------------------------------------------------------------

function showPage() {
  const page = (location.hash || "#new").slice(1);
  document.querySelectorAll(".page").forEach((section) => section.classList.toggle("active", section.id === `page-${page}`));
  document.querySelectorAll("nav a").forEach((link) => link.classList.toggle("active", link.dataset.page === page));
  Object.values(state.timers).forEach(clearInterval);
  state.timers = {};
  if (page === "runs") poll("runs", refreshRuns, 1000);
  if (page === "chat" || page === "export") fillRunChoices();
  if (page === "export") poll("export", refreshExport, 1000);
}

function poll(name, work, every) {
  work();
  state.timers[name] = setInterval(work, every);
}

// --- new run: the form made from the config schema ------------------------------------------------------------------

function buildForm(sections) {
  const form = $("#form");
  for (const section of sections) {
    const fieldset = element("fieldset", {}, element("legend", { text: section.name }));
    for (const field of section.fields) fieldset.append(fieldRow(field));
    form.append(fieldset);
  }
  form.addEventListener("input", () => debounce("check", checkForm, 300));
  form.addEventListener("change", () => debounce("check", checkForm, 50));
}

function fieldRow(field) {
  const id = `field-${field.key}`;
  let input;
  if (field.kind === "choice" || field.kind === "bool") {
    const choices = field.kind === "bool" ? ["true", "false"] : field.choices;
    input = element("select", { id });
    for (const choice of choices) input.append(element("option", { value: choice, text: choice || "(unset)" }));
    input.value = field.default;
  } else if (field.kind === "lines") {
    input = element("textarea", { id, placeholder: "one per line" });
    input.value = field.default;
  } else {
    input = element("input", { id, placeholder: field.default === "" ? "null" : "" });
    input.value = field.default;
  }
  Object.assign(input.dataset, { key: field.key, default: field.default, kind: field.kind });
  return element(
    "div", { class: "field", "data-key": field.key },
    element("label", { for: id, text: field.key }), input,
    element("span", { class: "description", text: field.description }),
    element("span", { class: "error" }),
  );
}

function answers() {
  const overrides = [];
  for (const input of document.querySelectorAll("#form [data-key]")) {
    const value = input.value;
    if (value === input.dataset.default) continue;
    overrides.push(`${input.dataset.key}=${yamlValue(value, input.dataset.kind)}`);
  }
  return overrides;
}

function yamlValue(value, kind) {
  if (kind === "lines") {
    const lines = value.split("\n").map((line) => line.trim()).filter(Boolean);
    return `[${lines.map((line) => (line.startsWith("{") ? line : JSON.stringify(line))).join(", ")}]`;
  }
  if (kind === "text") return value === "" ? "" : JSON.stringify(value);
  return value;
}

const pending = {};
function debounce(name, work, wait) {
  clearTimeout(pending[name]);
  pending[name] = setTimeout(work, wait);
}

// Checks overlap (the page's first one, for the defaults, can be slower than the next): only the latest one's answer
// is shown, so an older answer never overwrites the problems of what the form holds now.
let latestCheck = 0;
async function checkForm() {
  const check = ++latestCheck;
  try {
    const answer = await api("/api/config", { overrides: answers() });
    if (check !== latestCheck) return;
    $("#yaml").textContent = answer.yaml || "# the defaults";
    showProblems(answer.problems, "#form-problems");
  } catch (error) {
    if (check === latestCheck) showProblems([{ field: null, message: error.message }], "#form-problems");
  }
}

function showProblems(problems, list) {
  document.querySelectorAll(".field").forEach((field) => {
    field.classList.remove("invalid");
    field.querySelector(".error").textContent = "";
  });
  $(list).replaceChildren();
  for (const problem of problems) {
    const field = problem.field && document.querySelector(`.field[data-key="${problem.field}"]`);
    if (field) {
      field.classList.add("invalid");
      field.querySelector(".error").textContent += `${problem.message}\n`;
    } else {
      $(list).append(element("li", { text: problem.message }));
    }
  }
}

async function loadConfig() {
  try {
    const { values } = await api(`/api/config/file?path=${encodeURIComponent($("#load-path").value)}`);
    for (const input of document.querySelectorAll("#form [data-key]")) {
      const key = input.dataset.key;
      input.value = key in values ? values[key] : input.dataset.default;
    }
    checkForm();
  } catch (error) {
    showProblems([{ field: null, message: error.message }], "#form-problems");
  }
}

async function saveConfig() {
  try {
    const answer = await api("/api/config/save", { overrides: answers(), path: $("#save-path").value });
    showProblems(answer.problems, "#form-problems");
    $("#saved").textContent = answer.saved ? `saved ${answer.saved}` : "not saved: see the problems";
  } catch (error) {
    $("#saved").textContent = error.message;
  }
}

async function startRun() {
  try {
    const answer = await api("/api/runs", { overrides: answers() });
    showProblems(answer.problems, "#form-problems");
    if (answer.started) {
      state.selectedRun = answer.started;
      location.hash = "#runs";
    } else {
      $("#started").textContent = "not started: see the problems";
    }
  } catch (error) {
    $("#started").textContent = error.message;
  }
}

// --- data -----------------------------------------------------------------------------------------------------------

async function inspectData() {
  $("#data-report").textContent = "reading…";
  const answer = await api("/api/data", { overrides: answers() });
  $("#data-problems").replaceChildren(...answer.problems.map((problem) => element("li", { text: problem.message })));
  $("#data-report").replaceChildren();
  if (!answer.report) return;
  const report = answer.report;
  const table = element("table", { id: "data-summary" });
  for (const [what, value] of report.summary) table.append(element("tr", {}, element("td", { text: what }), element("td", { text: value })));
  $("#data-report").append(table, element("h3", { text: "Tokens per record" }), histogram(report.histogram));
  $("#data-report").append(element("h3", { text: "Samples (trained spans marked)" }));
  for (const sample of report.samples) {
    const box = element("div", { class: "sample" }, element("div", { class: "hint", text: sample.source }));
    for (const [text, trained] of sample.pieces) box.append(trained ? element("mark", { class: "trained", text }) : text);
    if (sample.cut_tokens) box.append(` ✂ [${sample.cut_tokens} tokens cut by max_length]`);
    $("#data-report").append(box);
  }
}

function histogram({ bin_width: width, counts }) {
  const svg = svgElement("svg", { viewBox: "0 0 600 160", id: "histogram" });
  const top = Math.max(...counts, 1);
  const barWidth = 560 / counts.length;
  counts.forEach((count, index) => {
    const height = (count / top) * 120;
    const bar = svgElement("rect", { class: "bar", x: 30 + index * barWidth, y: 130 - height, width: barWidth - 2, height });
    bar.append(svgElement("title", {}, `${index * width}–${(index + 1) * width - 1} tokens: ${count} records`));
    svg.append(bar);
  });
  svg.append(svgElement("text", { x: 30, y: 150, "font-size": 11 }, "0"));
  svg.append(svgElement("text", { x: 540, y: 150, "font-size": 11 }, `${counts.length * width} tokens`));
  return svg;
}

function svgElement(tag, attributes = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- runs -----------------------------------------------------------------------------------------------------------

async function refreshRuns() {
  const { runs } = await api("/api/runs");
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const row = element(
      "tr", { "data-path": run.path },
      element("td", { text: run.path }),
      element("td", {}, element("span", { class: `state ${run.state}`, text: run.state })),
      element("td", { text: run.max_steps ? `${run.step} / ${run.max_steps}` : "" }),
      element("td", { text: run.loss == null ? "" : run.loss.toFixed(4) }),
    );
    row.classList.toggle("selected", run.path === state.selectedRun);
    row.addEventListener("click", () => { state.selectedRun = run.path; refreshRuns(); });
    body.append(row);
  }
  if (state.selectedRun) await showRun(state.selectedRun);
}

async function showRun(path) {
  const run = await api(`/api/run?path=${encodeURIComponent(path)}`);
  $("#run-detail").hidden = false;
  $("#run-name").textContent = run.path;
  $("#run-state").textContent = run.state;
  $("#run-state").className = `state ${run.state}`;
  $("#run-progress").textContent = progressText(run);
  $("#stop").disabled = run.state !== "running";
  $("#resume").disabled = run.state !== "stopped";
  drawLoss(run.metrics);
  $("#run-log").textContent = run.log;
  $("#run-report").textContent = run.report || "(written when the run ends)";
  $("#run-eval").textContent = run.eval_results ? JSON.stringify(run.eval_results, null, 2) : "(lowtune eval writes it)";
  const images = run.files.filter((name) => name.endsWith(".png"));
  if ($("#run-images").dataset.shown !== images.join()) {
    $("#run-images").dataset.shown = images.join();
    $("#run-images").replaceChildren(...images.map((name) => element("img", { src: fileUrl(run.path, name), alt: name, width: 480 })));
  }
}

function fileUrl(path, name) {
  const url = `/api/run/file?path=${encodeURIComponent(path)}&name=${encodeURIComponent(name)}`;
  return token ? `${url}&token=${encodeURIComponent(token)}` : url; // an <img> cannot send a header
}

function progressText(run) {
  const last = run.metrics[run.metrics.length - 1];
  if (!last) return run.state === "running" ? "starting (reading data, loading the model)…" : "";
  const parts = [`step ${last.step} / ${last.max_steps}`];
  const rate = (last.step - last.first_step) / last.seconds;
  if (last.tokens_per_second) parts.push(`${Math.round(last.tokens_per_second).toLocaleString()} tokens/s`);
  if (run.state === "running" && rate > 0) parts.push(`ETA ${clock((last.max_steps - last.step) / rate)}`);
  if (last.peak_memory_gib) parts.push(`peak memory ${last.peak_memory_gib.toFixed(2)} GiB`);
  return parts.join(" · ");
}

function clock(seconds) {
  const whole = Math.max(0, Math.round(seconds));
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

function drawLoss(metrics) {
  const svg = $("#loss-curve");
  svg.replaceChildren();
  const train = metrics.filter((line) => line.loss !== undefined);
  const evaluation = metrics.filter((line) => line.eval_loss !== undefined);
  const values = [...train.map((line) => line.loss), ...evaluation.map((line) => line.eval_loss)];
  if (!values.length) return;
  const last = metrics[metrics.length - 1];
  const steps = Math.max(last.max_steps || 1, 1);
  const low = Math.min(...values), high = Math.max(...values);
  const x = (step) => 40 + (step / steps) * 540;
  const y = (value) => 210 - ((value - low) / (high - low || 1)) * 190;
  svg.append(svgElement("polyline", {
    class: "train", fill: "none", "stroke-width": 2, points: train.map((line) => `${x(line.step)},${y(line.loss)}`).join(" "),
  }));
  for (const line of train) svg.append(svgElement("circle", { class: "point train-point", cx: x(line.step), cy: y(line.loss), r: 2, fill: "#2f6fde" }));
  for (const line of evaluation) svg.append(svgElement("circle", { class: "point eval-point", cx: x(line.step), cy: y(line.eval_loss), r: 4, fill: "#e08a1e" }));
  svg.append(svgElement("text", { x: 2, y: 24, "font-size": 11 }, high.toFixed(3)));
  svg.append(svgElement("text", { x: 2, y: 214, "font-size": 11 }, low.toFixed(3)));
  svg.append(svgElement("text", { x: 520, y: 234, "font-size": 11 }, `step ${steps}`));
}

async function runAction(action) {
  try {
    await api(`/api/run/${action}`, { path: state.selectedRun });
    $("#run-problems").replaceChildren();
  } catch (error) {
    $("#run-problems").replaceChildren(element("li", { text: error.message }));
  }
  refreshRuns();
}

// --- chat -----------------------------------------------------------------------------------------------------------

async function fillRunChoices() {
  const { runs } = await api("/api/runs");
  for (const select of [$("#chat-run"), $("#export-run")]) {
    const chosen = select.value;
    select.replaceChildren();
    for (const run of runs) {
      if (run.state === "finished") select.append(element("option", { value: run.path, text: run.path }));
      else if (run.checkpoints.length && select.id === "chat-run") {
        const checkpoint = `${run.path}/${run.checkpoints[run.checkpoints.length - 1]}`;
        select.append(element("option", { value: checkpoint, text: `${checkpoint} (${run.state})` }));
      }
    }
    if (chosen) select.value = chosen;
  }
}

function chatTurn(who, text) {
  const turn = element("div", { class: `turn ${who}` }, element("span", { class: "who", text: who }));
  const body = element("div", { class: "text", text });
  turn.append(body);
  $("#chat-history").append(turn);
  return body;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text || !$("#chat-run").value) return;
  $("#chat-input").value = "";
  $("#chat-send").disabled = true;
  chatTurn("user", text);
  state.chatHistory.push({ role: "user", content: text });
  const withBase = $("#chat-base").checked;
  const replies = element("div", { class: "replies" });
  const sides = { adapter: element("div", { class: "reply adapter-reply" }) };
  replies.append(sides.adapter);
  if (withBase) replies.append((sides.base = element("div", { class: "reply base-reply" })));
  const turn = element("div", { class: "turn assistant" }, element("span", { class: "who", text: withBase ? "adapter | base" : "assistant" }), replies);
  $("#chat-history").append(turn);
  try {
    await streamChat({
      path: $("#chat-run").value, messages: state.chatHistory, system: $("#chat-system").value || null, with_base: withBase,
    }, (side, piece) => { sides[side].textContent += piece; });
    state.chatHistory.push({ role: "assistant", content: sides.adapter.textContent });
  } catch (error) {
    sides.adapter.textContent = error.message;
  } finally {
    $("#chat-send").disabled = false;
  }
}

async function streamChat(body, onPiece) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch("/api/chat", { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) throw new Error((await response.json()).problems?.join("\n") || response.statusText);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      const payload = JSON.parse(event.replace(/^data: /, ""));
      if (payload.text !== undefined) onPiece(payload.side, payload.text);
    }
  }
}

// --- export ---------------------------------------------------------------------------------------------------------

async function startExport(kind) {
  try {
    await api("/api/run/export", { path: $("#export-run").value, kind, gguf_type: $("#export-type").value });
    $("#export-problems").replaceChildren();
  } catch (error) {
    $("#export-problems").replaceChildren(element("li", { text: error.message }));
  }
}

async function refreshExport() {
  const path = $("#export-run").value;
  if (!path) return;
  const run = await api(`/api/run?path=${encodeURIComponent(path)}`);
  $("#export-log").textContent = run.export_log || "(nothing exported yet)";
  $("#export-report").textContent = run.merge_report ? JSON.stringify(run.merge_report, null, 2) : "(a merge writes merge_report.json)";
}

// --- start ----------------------------------------------------------------------------------------------------------

async function main() {
  const { sections, workspace } = await api("/api/schema");
  $("#workspace").textContent = `workspace ${workspace}`;
  buildForm(sections);
  checkForm();
  $("#load").addEventListener("click", loadConfig);
  $("#save").addEventListener("click", saveConfig);
  $("#start").addEventListener("click", startRun);
  $("#inspect").addEventListener("click", inspectData);
  $("#stop").addEventListener("click", () => runAction("stop"));
  $("#resume").addEventListener("click", () => runAction("resume"));
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-reset").addEventListener("click", () => { state.chatHistory = []; $("#chat-history").replaceChildren(); });
  $("#export-merge").addEventListener("click", () => startExport("merge"));
  $("#export-gguf").addEventListener("click", () => startExport("gguf"));
  $("#export-ollama").addEventListener("click", () => startExport("ollama"));
  window.addEventListener("hashchange", showPage);
  showPage();
}

main();
