// One picture at a time, answered by click or number key; the order is a seeded shuffle of the
// participant ID, so the same ID always sees the same order. Answers stay in this browser
// (localStorage) until downloaded, so a reload resumes where the participant left off.
"use strict";

(function () {
  const data = window.STUDY_DATA;
  const CSV_COLUMNS = ["study", "participant_id", "trial", "image_id", "response", "response_time_ms", "answered_at"];
  const $ = (id) => document.getElementById(id);

  // cyrb128: a 128-bit string hash, the seed of sfc32 (a small, well-tested 32-bit PRNG).
  function cyrb128(text) {
    let h1 = 1779033703, h2 = 3144134277, h3 = 1013904242, h4 = 2773480762;
    for (let i = 0; i < text.length; i++) {
      const k = text.charCodeAt(i);
      h1 = h2 ^ Math.imul(h1 ^ k, 597399067);
      h2 = h3 ^ Math.imul(h2 ^ k, 2869860233);
      h3 = h4 ^ Math.imul(h3 ^ k, 951274213);
      h4 = h1 ^ Math.imul(h4 ^ k, 2716044179);
    }
    h1 = Math.imul(h3 ^ (h1 >>> 18), 597399067);
    h2 = Math.imul(h4 ^ (h2 >>> 22), 2869860233);
    h3 = Math.imul(h1 ^ (h3 >>> 17), 951274213);
    h4 = Math.imul(h2 ^ (h4 >>> 19), 2716044179);
    h1 ^= h2 ^ h3 ^ h4;
    h2 ^= h1;
    h3 ^= h1;
    h4 ^= h1;
    return [h1 >>> 0, h2 >>> 0, h3 >>> 0, h4 >>> 0];
  }

  function sfc32(a, b, c, d) {
    return function () {
      a |= 0; b |= 0; c |= 0; d |= 0;
      const t = (((a + b) | 0) + d) | 0;
      d = (d + 1) | 0;
      a = b ^ (b >>> 9);
      b = (c + (c << 3)) | 0;
      c = (c << 21) | (c >>> 11);
      c = (c + t) | 0;
      return (t >>> 0) / 4294967296;
    };
  }

  // The presentation order of one participant: Fisher-Yates with a PRNG seeded by study and ID.
  function orderFor(pid) {
    const draw = sfc32(...cyrb128(data.study + "\u0000" + pid));
    for (let i = 0; i < 15; i++) draw();  // discard the first outputs, as sfc32's authors advise
    const order = data.items.slice();
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(draw() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    return order;
  }

  // Persisted per study and participant; storage can be unavailable (private modes), then memory only.
  function storageKey(pid) {
    return "study:" + data.study + ":" + pid;
  }

  function loadAnswers(pid) {
    try {
      return JSON.parse(window.localStorage.getItem(storageKey(pid))) || [];
    } catch (err) {
      return [];
    }
  }

  function saveAnswers(pid, answers) {
    try {
      window.localStorage.setItem(storageKey(pid), JSON.stringify(answers));
    } catch (err) {
      // Nothing to do: the answers are still in memory and downloadable at the end.
    }
  }

  // Remembers a confirmed upload, so that reopening the finished study does not send it twice.
  function wasSent(pid) {
    try {
      return window.localStorage.getItem(storageKey(pid) + ":sent") === "true";
    } catch (err) {
      return false;
    }
  }

  function markSent(pid) {
    try {
      window.localStorage.setItem(storageKey(pid) + ":sent", "true");
    } catch (err) {
      // Storage unavailable: a reload may send the answers again; the scorer would flag the duplicate.
    }
  }

  function csvField(value) {
    const text = String(value);
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function toCsv(pid, answers) {
    const lines = [CSV_COLUMNS.join(",")];
    for (const a of answers) {
      lines.push([data.study, pid, a.trial, a.image_id, a.response, a.response_time_ms, a.answered_at]
        .map(csvField).join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  const state = { pid: null, order: [], answers: [], shownAt: 0, ready: false };

  function show(section) {
    for (const id of ["start", "trial", "done"]) $(id).hidden = id !== section;
  }

  function buildChoices() {
    const box = $("choices");
    data.choices.forEach((name, key) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.key = String(key);
      const kbd = document.createElement("kbd");
      kbd.textContent = String(key);
      button.append(kbd, document.createTextNode(name));
      button.addEventListener("click", () => answer(key));
      box.append(button);
    });
  }

  function setReady(ready) {
    state.ready = ready;
    $("trial").setAttribute("aria-busy", String(!ready));
    for (const button of $("choices").querySelectorAll("button")) button.disabled = !ready;
  }

  function showTrial() {
    const trial = state.answers.length;
    if (trial >= state.order.length) {
      finish();
      return;
    }
    setReady(false);
    $("progress-text").textContent = "Picture " + (trial + 1) + " of " + state.order.length;
    $("progress").value = trial / state.order.length;
    const img = $("stimulus");
    img.onload = () => {
      state.shownAt = performance.now();
      setReady(true);
      const next = state.order[trial + 1];
      if (next !== undefined) new Image().src = "images/" + next + ".png";  // preload
    };
    img.onerror = () => {
      $("progress-text").textContent = "This picture could not be loaded. Please reload the page.";
    };
    img.src = "images/" + state.order[trial] + ".png";
  }

  function answer(key) {
    if (!state.ready || key < 0 || key >= data.choices.length) return;
    setReady(false);
    state.answers.push({
      trial: state.answers.length + 1,
      image_id: state.order[state.answers.length],
      response: data.choices[key],
      response_time_ms: Math.round(performance.now() - state.shownAt),
      answered_at: new Date().toISOString(),
    });
    saveAnswers(state.pid, state.answers);
    showTrial();
  }

  function download() {
    const blob = new Blob([toCsv(state.pid, state.answers)], { type: "text/csv" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "responses-" + state.pid.replace(/[^A-Za-z0-9_-]+/g, "_") + ".csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // text/plain keeps the POST a "simple" cross-origin request (no preflight); the receiver must
  // answer with Access-Control-Allow-Origin for the page to confirm the upload.
  async function upload() {
    const status = $("upload-status");
    status.textContent = "Sending your answers…";
    try {
      const response = await fetch(data.post_url, {
        method: "POST",
        headers: { "Content-Type": "text/plain;charset=UTF-8" },
        body: toCsv(state.pid, state.answers),
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      status.textContent = "Your answers were sent.";
      status.dataset.sent = "true";
      markSent(state.pid);
    } catch (err) {
      status.textContent = "Your answers could not be sent automatically (" + err.message +
        "). Please download the file instead.";
      status.dataset.sent = "false";
    }
  }

  function finish() {
    show("done");
    $("progress").value = 1;
    $("done-summary").textContent = "You answered all " + state.order.length + " pictures.";
    if (!data.post_url) return;
    if (wasSent(state.pid)) {
      $("upload-status").textContent = "Your answers were already sent.";
      $("upload-status").dataset.sent = "true";
    } else {
      upload();
    }
  }

  function start(pid) {
    state.pid = pid;
    state.order = orderFor(pid);
    const saved = loadAnswers(pid);
    let resumed = 0;  // the saved answers that still match this order (all of them unless tampered with)
    while (resumed < saved.length && saved[resumed].image_id === state.order[resumed]) resumed++;
    state.answers = saved.slice(0, resumed);
    show("trial");
    showTrial();
  }

  document.addEventListener("keydown", (event) => {
    if ($("trial").hidden || event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
    if (/^[0-9]$/.test(event.key)) {
      event.preventDefault();
      answer(Number(event.key));
    }
  });

  $("start-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const pid = $("pid").value.trim();
    if (!pid) {
      $("start-error").textContent = "Please enter your participant ID.";
      return;
    }
    start(pid);
  });
  $("download").addEventListener("click", download);

  document.documentElement.style.setProperty("--display-size", data.display_size + "px");
  buildChoices();
  const fromUrl = new URLSearchParams(window.location.search).get("pid");
  if (fromUrl) $("pid").value = fromUrl.trim();
  window.studyOrder = orderFor;  // lets a researcher reproduce a participant's order from the console
})();
