// The web chat: streams replies from /v1/chat/completions with the sliders' ARM weights in the "arms" field.
// No build step and nothing from a CDN: this file, index.html and style.css are everything the page loads.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { messages: [], props: null, key: localStorage.getItem("genarm-api-key") || "", controllers: [] };

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (chat.key) headers.Authorization = `Bearer ${chat.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it on the left");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not an OpenAI error body */ }
    throw Object.assign(new Error(message), { status: response.status });
  }
  return response;
}

function showError(error) {
  $("error").hidden = !error;
  $("error").textContent = error ? String(error.message || error) : "";
}

function buildSliders(arms) {
  const box = $("sliders");
  box.replaceChildren();
  if (!Object.keys(arms).length) box.textContent = "No ARM loaded: replies come from the base alone.";
  for (const [name, alpha] of Object.entries(arms)) {
    const wrap = document.createElement("div");
    wrap.className = "slider";
    const label = document.createElement("label");
    const output = document.createElement("output");
    const input = document.createElement("input");
    // step 0.01: an ARM's recommended α (e.g. 0.68) is shown and sent as it is, not rounded to a coarser step
    Object.assign(input, { type: "range", min: -3, max: 3, step: 0.01, value: alpha, id: `arm-${name}` });
    input.dataset.arm = name;
    label.htmlFor = input.id;
    label.append(name, output);
    output.textContent = Number(input.value).toFixed(2);
    input.addEventListener("input", () => { output.textContent = Number(input.value).toFixed(2); });
    wrap.append(label, input);
    box.append(wrap);
  }
}

function weights(zero = false) {
  const arms = {};
  for (const input of document.querySelectorAll("#sliders input")) arms[input.dataset.arm] = zero ? 0 : Number(input.value);
  return arms;
}

function describe(arms) {
  const parts = Object.entries(arms).map(([name, alpha]) => `${name} ${alpha}`);
  return parts.length ? parts.join(" · ") : "base";
}

function replyBox(parent, kind, arms) {
  const box = document.createElement("div");
  box.className = `reply ${kind} streaming`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = kind === "base" ? "base alone" : `guided: ${describe(arms)}`;
  const text = document.createElement("span");
  text.className = "text";
  box.append(label, text);
  parent.append(box);
  return box;
}

// One streamed reply: SSE "data:" lines, each a chat.completion.chunk; the finish chunk carries timings and arms.
async function streamReply(box, arms, seed, showSpeed) {
  const controller = new AbortController();
  chat.controllers.push(controller);
  const body = {
    messages: chat.messages, stream: true, timings_per_token: true, arms, seed,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  const text = box.querySelector(".text");
  let reply = "";  // as generated, for the history; shown without the space a model often starts a reply with
  let painted = 0;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices[0]?.delta?.content;
        if (delta) {
          reply += delta;
          text.textContent = reply.trimStart();
        }
        // timings_per_token: the server's own count and clock in every chunk (a chunk may carry several tokens)
        if (chunk.timings && showSpeed) $("speed").textContent = `${chunk.timings.predicted_per_second.toFixed(1)} tok/s`;
        if (chunk.arms && box.classList.contains("guided")) {
          box.querySelector(".label").textContent = `guided: ${describe(chunk.arms)}`;  // as the server applied them
        }
        if (chunk.choices[0]?.finish_reason) box.dataset.finish = chunk.choices[0].finish_reason;
      }
      $("transcript").scrollTop = $("transcript").scrollHeight;
      // how many network reads painted text into this reply: more than one is text shown while it streams
      if (text.textContent.length > painted) box.dataset.paints = String(Number(box.dataset.paints || 0) + 1);
      painted = text.textContent.length;
    }
  } finally {
    box.classList.remove("streaming");
    box.dataset.done = "true";
  }
  return reply;
}

// Under side-by-side replies: which one was better, appended by the server to its preference file as a TRL pair
// (the conversation both replies answer, the chosen one, the other) for `genarm-local train --data`.
function addChoice(turn, messages, replies) {
  if (!replies.base.trim() || !replies.guided.trim() || replies.base === replies.guided) return;
  const box = document.createElement("div");
  box.className = "choice";
  const saved = document.createElement("span");
  saved.className = "saved muted";
  const buttons = ["base", "guided"].map((side) => {
    const button = document.createElement("button");
    Object.assign(button, { type: "button", textContent: `${side} is better` });
    button.dataset.prefer = side;
    button.addEventListener("click", async () => {
      const other = side === "base" ? "guided" : "base";
      buttons.forEach((b) => { b.disabled = true; });
      try {
        const body = { messages, chosen: replies[side], rejected: replies[other] };
        const answer = await (await api("/v1/preferences", { method: "POST", body: JSON.stringify(body) })).json();
        button.classList.add("picked");
        saved.textContent = `saved to ${answer.path}`;
        box.dataset.saved = side;
      } catch (error) {
        buttons.forEach((b) => { b.disabled = false; });
        showError(error);
      }
    });
    return button;
  });
  box.append(...buttons, saved);
  turn.append(box);
}

async function send(event) {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || $("send").disabled) return;
  showError(null);
  $("message").value = "";
  $("send").disabled = true;
  $("stop").disabled = false;
  chat.messages.push({ role: "user", content });
  const turn = document.createElement("div");
  turn.className = "turn";
  const user = document.createElement("div");
  user.className = "user";
  user.textContent = content;
  const replies = document.createElement("div");
  const compare = $("compare").checked;
  replies.className = compare ? "replies two" : "replies";
  turn.append(user, replies);
  $("transcript").append(turn);
  // Both sides of a comparison sample with the same seed: only the weights differ.
  const seed = Math.floor(Math.random() * 2 ** 31);
  const arms = weights();
  const prompt = chat.messages.slice();  // what both replies answer
  const sides = [];
  if (compare) sides.push(streamReply(replyBox(replies, "base", weights(true)), weights(true), seed, false));
  sides.push(streamReply(replyBox(replies, "guided", arms), arms, seed, true));
  try {
    const texts = await Promise.all(sides);
    chat.messages.push({ role: "assistant", content: texts[texts.length - 1] });
    if (compare) addChoice(turn, prompt, { base: texts[0], guided: texts[1] });
  } catch (error) {
    if (error.name !== "AbortError") showError(error);
    chat.messages.pop();
  } finally {
    chat.controllers = [];
    $("send").disabled = false;
    $("stop").disabled = true;
    $("message").focus();
  }
}

async function load() {
  try {
    chat.props = await (await api("/props")).json();
    showError(null);
    $("model").textContent = `${chat.props.default_model} · ${chat.props.parallel} slots`;
    if (chat.props.sampling?.temperature !== undefined) $("temperature").value = chat.props.sampling.temperature;
    buildSliders(chat.props.arms);
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(error);
    if (error.status === 503) setTimeout(load, 1000);  // the model is still loading
  }
}

function setup() {
  $("composer").addEventListener("submit", send);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => chat.controllers.forEach((controller) => controller.abort()));
  $("reset").addEventListener("click", () => { chat.messages = []; $("transcript").replaceChildren(); showError(null); });
  $("key").value = chat.key;
  $("key").addEventListener("change", () => {
    chat.key = $("key").value.trim();
    localStorage.setItem("genarm-api-key", chat.key);
    load();
  });
  load();
}

setup();
