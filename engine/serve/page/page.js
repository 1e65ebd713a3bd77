// framepack serve's web page. It uses the public HTTP API only (the requests any frontend sends):
//   GET /openapi.json    the submission schema of POST /v1/jobs, from which the form is built
//   GET /v1/info         the model, its variant and LoRAs
//   POST /v1/jobs        Generate and Retry (multipart: a `settings` JSON field and the image files)
//   GET /v1/jobs         the queue, polled (states, positions, progress)
//   GET /v1/jobs/ID/events?previews=true   each running job's steps and latent previews (Server-Sent Events)
//   GET /v1/jobs/ID/video, /inputs/NAME    the video and the input images, fetched with the key as blobs
//   DELETE /v1/jobs/ID (?remove=true)      Cancel and Delete
// The API key (when the server has one) is asked once and kept in this tab's sessionStorage; it travels in the
// Authorization header only, never in a URL.
"use strict";

(() => {
  const KEY_STORAGE = "framepack-api-key";
  // These settings stand in the form itself, in this order; every other one (new ones too) goes under Advanced.
  const MAIN_FIELDS = ["prompt", "section_prompts", "image", "end_image", "seconds", "seed", "steps", "cache", "cfg"];
  const API_ONLY = ["keyframes", "control_images", "control_masks", "one_frame", "target_index", "control_index",
    "one_frame_options"];
  const LABELS = {
    image: "Start image", end_image: "End image", cfg: "CFG", crf: "CRF", fps: "FPS",
    vae_decode: "VAE decode", magcache_k: "MagCache K", magcache_retention: "MagCache retention",
    magcache_calibration: "MagCache calibration",
  };
  const TEXTAREAS = new Set(["prompt", "negative_prompt", "section_prompts"]);
  // Uploads here are files, not the API's base64 texts.
  const FILE_HELP = {
    image: "The video starts from it (image-to-video): a PNG, JPEG or WebP file.",
    end_image: "The video ends on it (first-last-frame video, with the bidirectional model).",
  };
  const FINISHED = new Set(["done", "failed", "cancelled"]);
  const SEED_RANGE = 2 ** 32;  // the dice's seeds (any seed the server takes can be typed)

  const state = {
    properties: {},     // the submission schema's properties
    fields: [],         // {name, kind, nullable, default, input, ...} of every form field
    imageNames: [],     // the upload fields (binary in the multipart schema)
    info: null,
    jobs: new Map(),    // id -> {job, element, following, followedAt, preview, video}
    online: null,
    keyRequest: null,
    videoLoads: 0,
  };

  let pollTimer = null;  // the next poll of the queue

  const $ = (selector, root = document) => root.querySelector(selector);

  function element(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children);
    return node;
  }

  // ------------------------------------------------------------------------------------------------------------
  // The API, with the key
  // ------------------------------------------------------------------------------------------------------------

  function storedKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  // Shows the key dialog (once for all requests waiting on it) and resolves when a key has been entered.
  function askForKey(message) {
    if (!state.keyRequest) {
      state.keyRequest = new Promise((resolve) => {
        const dialog = $("#key-dialog");
        const form = $("#key-form");
        const input = $("#api-key");
        $("#key-error").textContent = message || "";
        input.value = "";
        form.onsubmit = (event) => {
          event.preventDefault();
          const key = input.value.trim();
          if (!key) {
            $("#key-error").textContent = "Enter the key the server was started with.";
            return;
          }
          sessionStorage.setItem(KEY_STORAGE, key);
          input.value = "";
          dialog.close();
          state.keyRequest = null;
          resolve();
        };
        dialog.oncancel = (event) => event.preventDefault();  // nothing works without it
        dialog.showModal();
        input.focus();
      });
    }
    return state.keyRequest;
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
    } catch (error) {
      // not JSON: the status says it
    }
    return `The server answered ${response.status} ${response.statusText}.`;
  }

  // fetch() with the key; a 401 asks for the key (again) and repeats the request.
  async function api(path, options = {}) {
    const keyNeeded = document.documentElement.dataset.apiKey === "required";
    for (;;) {
      if (keyNeeded && !storedKey()) await askForKey("");
      const headers = new Headers(options.headers || {});
      const key = storedKey();
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
      if (response.status !== 401) return response;
      const detail = await detailOf(response);
      sessionStorage.removeItem(KEY_STORAGE);
      await askForKey(key ? detail : "");
    }
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw new Error(await detailOf(response));
    return response.json();
  }

  function setOnline(online) {
    if (online === state.online) return;
    const wasOffline = state.online === false;
    state.online = online;
    $("#connection").textContent = online
      ? (wasOffline ? "Connected again: the queue below is the server's." : "")
      : "The server does not answer: trying again every 2 seconds…";
    document.body.classList.toggle("offline", !online);
  }

  // ------------------------------------------------------------------------------------------------------------
  // The form, built from the submission schema
  // ------------------------------------------------------------------------------------------------------------

  function labelOf(name) {
    if (LABELS[name]) return LABELS[name];
    const words = name.replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  // (kind, nullable) of a schema property: "boolean", "integer", "number", "choice", "text" or "texts".
  function kindOf(property) {
    let nullable = false;
    let types = [property];
    if (property.anyOf) {
      types = property.anyOf.filter((item) => item.type !== "null");
      nullable = types.length < property.anyOf.length;
    }
    if (types.length > 1) return ["texts", nullable];  // a text or a list of texts
    const type = types[0];
    if (type.enum) return ["choice", nullable, type.enum];
    if (type.type === "boolean" || type.type === "integer" || type.type === "number") return [type.type, nullable];
    if (type.type === "array") return ["texts", nullable];
    return ["text", nullable];
  }

  function buildField(name, property) {
    const id = `field-${name}`;
    const helpId = `${id}-help`;
    const field = { name, default: property.default === undefined ? null : property.default };
    const box = element("div", { class: `field field-${name}` });
    box.append(element("label", { for: id, text: labelOf(name) }));
    const help = element("p", { id: helpId, class: "help", text: FILE_HELP[name] || property.description || "" });
    if (state.imageNames.includes(name)) {
      field.kind = "file";
      field.input = element("input", { id, name, type: "file", accept: "image/*", "aria-describedby": helpId });
      buildDropZone(field, box);
    } else {
      const [kind, nullable, choices] = kindOf(property);
      Object.assign(field, { kind, nullable });
      if (kind === "boolean") {
        field.input = element("input", { id, name, type: "checkbox", "aria-describedby": helpId });
        box.classList.add("check");
      } else if (kind === "choice") {
        field.input = element("select", { id, name, "aria-describedby": helpId });
        if (nullable) field.input.append(element("option", { value: "", text: "none" }));
        for (const value of choices) field.input.append(element("option", { value, text: value }));
      } else if (kind === "integer" || kind === "number") {
        field.input = element("input", {
          id, name, type: "number", step: kind === "integer" ? 1 : "any", min: property.minimum,
          max: property.maximum, placeholder: nullable ? "auto" : undefined, "aria-describedby": helpId,
          inputmode: kind === "integer" ? "numeric" : "decimal",
        });
      } else if (TEXTAREAS.has(name) || kind === "texts") {
        field.input = element("textarea", { id, name, rows: name === "prompt" ? 3 : 2, "aria-describedby": helpId });
      } else {
        field.input = element("input", { id, name, type: "text", "aria-describedby": helpId });
      }
      if (name === "seed") {
        const dice = element("button", { type: "button", class: "dice", title: "A random seed",
          "aria-label": "Random seed" }, element("img", { src: "/page/dice.svg", alt: "", width: 20, height: 20 }));
        dice.addEventListener("click", () => {
          field.input.value = String(crypto.getRandomValues(new Uint32Array(1))[0] % SEED_RANGE);
        });
        box.append(element("div", { class: "with-button" }, field.input, dice));
      } else if (field.kind !== "file") {
        box.append(field.input);
      }
      writeField(field, field.default);
    }
    box.append(help);
    if (name === "section_prompts") box.append($("#section-prompts-help").content.cloneNode(true));
    field.box = box;
    return field;
  }

  function buildDropZone(field, box) {
    const zone = element("div", { class: "drop" });
    const preview = element("img", { class: "drop-preview", alt: "", hidden: true });
    const clear = element("button", { type: "button", class: "clear", text: "Remove", hidden: true });
    const hint = element("p", { class: "drop-hint", text: "Choose a file, or drop an image here." });
    zone.append(field.input, hint, preview, clear);
    box.append(zone);
    Object.assign(field, { zone, preview, clear, hint });
    field.input.addEventListener("change", () => showImage(field));
    clear.addEventListener("click", () => setImage(field, null));
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = [...(event.dataTransfer ? event.dataTransfer.files : [])].find(Boolean);
      if (file) setImage(field, file);
    });
  }

  function setImage(field, file) {
    const transfer = new DataTransfer();
    if (file) transfer.items.add(file);
    field.input.files = transfer.files;
    showImage(field);
  }

  function showImage(field) {
    const file = field.input.files[0];
    if (field.previewUrl) URL.revokeObjectURL(field.previewUrl);
    field.previewUrl = file ? URL.createObjectURL(file) : null;
    field.preview.hidden = field.clear.hidden = !file;
    field.hint.hidden = Boolean(file);
    if (file) {
      field.preview.src = field.previewUrl;
      field.preview.alt = `${labelOf(field.name)}: ${file.name}`;
    } else {
      field.preview.removeAttribute("src");
    }
  }

  function writeField(field, value) {
    const input = field.input;
    if (field.kind === "boolean") input.checked = Boolean(value);
    else if (value === null || value === undefined) input.value = "";
    else if (Array.isArray(value)) input.value = value.join("\n");
    else input.value = String(value);
  }

  // The value to send, or undefined to leave the setting to the server (empty, or as the default).
  function readField(field) {
    const input = field.input;
    let value;
    if (field.kind === "boolean") value = input.checked;
    else if (field.kind === "integer" || field.kind === "number") {
      if (input.value.trim() === "") return undefined;
      value = Number(input.value);
      if (Number.isNaN(value)) value = input.value;  // the server names the problem
    } else if (field.kind === "choice") value = input.value === "" && field.nullable ? null : input.value;
    else if (field.kind === "texts") {
      const text = input.value.trim();
      if (!text) return undefined;
      // Timestamped prompts go as one text; otherwise one entry per line (or per '|'), as on the command line.
      value = text.includes("[") ? text : text.split(/[\n|]/).map((part) => part.trim()).filter(Boolean);
    } else {
      value = input.value;
      if (value === "" && field.nullable) value = null;
    }
    return JSON.stringify(value) === JSON.stringify(field.default) ? undefined : value;
  }

  function formSettings() {
    const settings = {};
    for (const field of state.fields) {
      if (field.kind === "file") continue;
      const value = readField(field);
      if (value !== undefined) settings[field.name] = value;
    }
    return settings;
  }

  async function buildForm() {
    const [openapi, info] = await Promise.all([apiJson("/openapi.json"), apiJson("/v1/info")]);
    state.info = info;
    const content = openapi.paths["/v1/jobs"].post.requestBody.content;
    const schema = content["application/json"].schema;
    const multipart = (content["multipart/form-data"] || {}).schema || { properties: {} };
    state.imageNames = Object.entries(multipart.properties)
      .filter(([, property]) => property.format === "binary").map(([name]) => name);
    state.properties = schema.properties;
    // Keyframes and one-frame control images are lists of files, and a one-frame job makes an image where the page
    // plays videos: the API takes them, the form leaves them out.
    const names = Object.keys(schema.properties).filter((name) => !API_ONLY.includes(name));
    const main = MAIN_FIELDS.filter((name) => names.includes(name));
    const advanced = names.filter((name) => !main.includes(name));
    for (const name of main) {
      const field = buildField(name, schema.properties[name]);
      state.fields.push(field);
      $("#fields").append(field.box);
    }
    for (const name of advanced) {
      const field = buildField(name, schema.properties[name]);
      state.fields.push(field);
      $("#advanced-fields").append(field.box);
    }
    $("#advanced").hidden = advanced.length === 0;
    const endImage = state.fields.find((field) => field.name === "end_image");
    if (endImage && info.variant && info.variant !== "bidirectional") {
      endImage.input.disabled = true;
      endImage.hint.textContent = `End images need the bidirectional model; this server runs the ${info.variant} one.`;
    }
    showModel(info);
    $("#form-loading").remove();
    $("#generate").disabled = false;
  }

  function showModel(info) {
    const parts = [`Model: ${info.model || "?"}`];
    if (info.variant) parts.push(info.variant);
    if (info.devices) parts.push(info.devices.join(", "));
    if (info.attention) parts.push(`attention ${info.attention}`);
    if (info.loras) {
      parts.push(info.loras.length
        ? `LoRAs: ${info.loras.map((lora) => `${lora.name} × ${lora.strength}`).join(", ")}`
        : "no LoRA");
    }
    $("#model").textContent = parts.join(" · ");
  }

  async function submit(settings, files) {
    const body = new FormData();
    body.append("settings", JSON.stringify(settings));
    for (const [name, file] of Object.entries(files)) body.append(name, file, file.name || name);
    const response = await api("/v1/jobs", { method: "POST", body });
    if (response.status !== 202) throw new Error(await detailOf(response));
    const job = await response.json();
    upsert(job);
    order();
    clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, 500);
    return job;
  }

  async function generate(event) {
    event.preventDefault();
    const button = $("#generate");
    const error = $("#form-error");
    error.textContent = "";
    button.disabled = true;
    try {
      const files = {};
      for (const field of state.fields) {
        if (field.kind === "file" && field.input.files[0]) files[field.name] = field.input.files[0];
      }
      await submit(formSettings(), files);
    } catch (problem) {
      error.textContent = problem instanceof TypeError ? "The server does not answer: try again in a moment." :
        problem.message;
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------------------------
  // The queue
  // ------------------------------------------------------------------------------------------------------------

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
    if (seconds < 60) return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function newEntry(job) {
    const item = $("#job-template").content.firstElementChild.cloneNode(true);
    const entry = { job, element: item, following: false, followedAt: 0, preview: null, video: null };
    item.dataset.id = job.id;
    item.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) act(entry, button.dataset.action, button);
    });
    state.jobs.set(job.id, entry);
    visibility.observe(item);
    return entry;
  }

  // A job as the API lists it (a poll, a submission, a cancel).
  function upsert(job) {
    let entry = state.jobs.get(job.id);
    if (!entry) entry = newEntry(job);
    else if (entry.following && job.state === "running") {
      // The events stream has newer progress than a poll: keep it, take the rest.
      entry.job = { ...job, progress: entry.job.progress };
    } else entry.job = job;
    render(entry);
    // The running jobs' events, and the next one's, so its start is seen at once (a few streams at most: the
    // browser opens only six connections to a server).
    const watched = job.state === "running" || (job.state === "queued" && job.position === 0);
    if (watched && !entry.following && Date.now() - entry.followedAt > 1000) follow(entry);
    return entry;
  }

  // Newest first.
  function order() {
    const list = $("#jobs");
    const entries = [...state.jobs.values()].sort((a, b) => b.job.submitted_at - a.job.submitted_at);
    entries.forEach((entry, index) => {
      if (list.children[index] !== entry.element) list.insertBefore(entry.element, list.children[index] || null);
    });
    $("#empty").hidden = entries.length > 0;
  }

  function forget(entry) {
    visibility.unobserve(entry.element);
    entry.element.remove();
    if (entry.video) URL.revokeObjectURL(entry.video);
    if (entry.abort) entry.abort.abort();
    state.jobs.delete(entry.job.id);
    $("#empty").hidden = state.jobs.size > 0;
  }

  function render(entry) {
    const { job, element: item } = entry;
    const progress = job.progress || {};
    const settings = job.settings || {};
    item.dataset.state = job.state;
    $(".job-state", item).textContent = job.state;
    $(".job-prompt", item).textContent = settings.prompt || "(no prompt)";
    const facts = [`${settings.seconds} s`, `seed ${settings.seed}`, `${settings.steps} steps`];
    if (job.inputs && job.inputs.length) facts.push(job.inputs.map(labelOf).join(" + ").toLowerCase());
    if (job.output) facts.push(job.output.format);
    if (job.cancel_requested && job.state === "running") facts.push("cancelling at the next step");
    facts.push(`job ${job.id}`);
    $(".job-facts", item).textContent = facts.join(" · ");
    $(".job-position", item).textContent = job.state === "queued"
      ? (job.position ? `${job.position} job${job.position === 1 ? "" : "s"} ahead` : "next to start") : "";

    const sections = progress.sections || job.sections || 1;
    const done = progress.sections_done || 0;
    const steps = progress.steps || settings.steps || 1;
    const running = job.state === "running";
    const step = running && progress.step ? progress.step : (job.state === "done" ? steps : 0);
    const section = running ? (progress.section || done + 1) : done;
    const sectionBar = $(".section-bar", item);
    sectionBar.max = sections;
    sectionBar.value = Math.min(sections, running ? done + step / steps : done);
    $(".section-text", item).textContent = `Section ${Math.max(section, 0)} of ${sections}`;
    const stepBar = $(".step-bar", item);
    stepBar.max = steps;
    stepBar.value = step;
    $(".step-text", item).textContent = `Step ${step} of ${steps}`;
    let eta = "";
    if (running) {
      eta = progress.eta_seconds === null || progress.eta_seconds === undefined
        ? "estimating the time left…" : `about ${duration(progress.eta_seconds)} left`;
    } else if (FINISHED.has(job.state) && job.stats && job.stats.seconds) {
      eta = `took ${duration(job.stats.seconds)}`;
    }
    $(".job-eta", item).textContent = eta;

    const figure = $(".job-preview", item);
    figure.hidden = !(running && entry.preview);
    if (running && entry.preview) {
      const img = $("img", figure);
      if (img.src !== entry.preview.url) img.src = entry.preview.url;
      const where = `section ${entry.preview.section}, step ${entry.preview.step}`;
      img.alt = `Latent preview, ${where}`;
      $("figcaption", figure).textContent = `Latent preview (${where})`;
    }

    const error = $(".job-error", item);
    error.hidden = !job.error;
    error.textContent = job.error || "";

    const finished = FINISHED.has(job.state);
    $("[data-action=cancel]", item).hidden = finished;
    $("[data-action=cancel]", item).disabled = Boolean(job.cancel_requested);
    $("[data-action=delete]", item).hidden = !finished;
    $("[data-action=retry]", item).hidden = !finished;
    $(".job-video", item).hidden = !entry.video;
    if (finished && job.links && job.links.video && !entry.video && entry.visible) loadVideo(entry);
  }

  // Videos load (with the key, as blobs) once their job is finished and its list item is on screen.
  const visibility = new IntersectionObserver((records) => {
    for (const record of records) {
      const entry = state.jobs.get(record.target.dataset.id);
      if (!entry) continue;
      entry.visible = record.isIntersecting;
      if (entry.visible) render(entry);
    }
  }, { rootMargin: "300px" });

  async function loadVideo(entry) {
    if (entry.videoLoading || state.videoLoads >= 2) return;
    entry.videoLoading = true;
    state.videoLoads += 1;
    try {
      const response = await api(entry.job.links.video);
      if (!response.ok) throw new Error(await detailOf(response));
      const blob = await response.blob();
      if (!state.jobs.has(entry.job.id)) return;
      entry.video = URL.createObjectURL(blob);
      const video = $("video", entry.element);
      video.src = entry.video;
      video.setAttribute("aria-label", `Video of job ${entry.job.id}`);
      const link = $(".download", entry.element);
      link.href = entry.video;
      link.download = `framepack_${entry.job.id}.${entry.job.output.format}`;
      $(".job-video", entry.element).hidden = false;
    } catch (problem) {
      entry.videoFailed = true;
    } finally {
      entry.videoLoading = false;
      state.videoLoads -= 1;
      // The next waiting video, if any.
      for (const other of state.jobs.values()) {
        if (!other.video && !other.videoLoading && !other.videoFailed && other.visible && FINISHED.has(other.job.state)
            && other.job.links && other.job.links.video) {
          loadVideo(other);
          break;
        }
      }
    }
  }

  // A job's events: its state, progress at every step, its latent previews, its end. A stream that breaks (the
  // server stopped) is opened again by the next poll that finds the job running.
  async function follow(entry) {
    entry.following = true;
    entry.followedAt = Date.now();
    entry.abort = new AbortController();
    try {
      const response = await api(`${entry.job.links.events}?previews=true`, { signal: entry.abort.signal });
      if (!response.ok || !response.body) return;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          handleEvent(entry, block);
        }
      }
    } catch (problem) {
      // the server went away or the job was forgotten: the queue's poll takes it from here
    } finally {
      entry.following = false;
      entry.followedAt = Date.now();
    }
  }

  function handleEvent(entry, block) {
    let name = "message";
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5);
    }
    if (!data) return;
    const payload = JSON.parse(data);
    const job = entry.job;
    if (name === "state") {
      entry.job = { ...job, state: payload.state, position: payload.position };
    } else if (name === "progress") {
      entry.job = { ...job, progress: { ...job.progress, ...payload } };
    } else if (name === "section") {
      const progress = { ...job.progress, sections_done: payload.sections_done, frames: payload.frames };
      entry.job = { ...job, frames: payload.frames, progress };
    } else if (name === "preview") {
      entry.preview = { url: `data:image/jpeg;base64,${payload.jpeg}`, section: payload.section, step: payload.step };
    } else if (FINISHED.has(name)) {
      entry.job = payload;
      clearTimeout(pollTimer);  // the counts and the next job's start
      pollTimer = setTimeout(poll, 200);
    }
    render(entry);
  }

  async function act(entry, action, button) {
    const job = entry.job;
    const error = $("#queue-error");
    error.textContent = "";
    button.disabled = true;
    try {
      if (action === "cancel") {
        const response = await api(job.links.self, { method: "DELETE" });
        if (!response.ok && response.status !== 409) throw new Error(await detailOf(response));
        if (response.ok) upsert(await response.json());
      } else if (action === "delete") {
        const response = await api(`${job.links.self}?remove=true`, { method: "DELETE" });
        if (!response.ok && response.status !== 404) throw new Error(await detailOf(response));
        forget(entry);
      } else if (action === "retry") {
        await submit(sameSettings(job), await inputFiles(job));
      } else if (action === "reuse") {
        await useSettings(job);
      }
    } catch (problem) {
      error.textContent = problem instanceof TypeError ? "The server does not answer: try again in a moment." :
        problem.message;
    } finally {
      button.disabled = action === "cancel" && Boolean(entry.job.cancel_requested);
    }
  }

  // A job's settings as a submission: what it ran with, the output format and quality, known to this server.
  function sameSettings(job) {
    const settings = {};
    for (const [name, value] of Object.entries({ ...job.settings, ...(job.output || {}) })) {
      if (name in state.properties) settings[name] = value;
    }
    return settings;
  }

  async function inputFiles(job) {
    const files = {};
    for (const [name, link] of Object.entries((job.links && job.links.inputs) || {})) {
      const response = await api(link);
      if (!response.ok) throw new Error(await detailOf(response));
      const blob = await response.blob();
      const type = blob.type.split("/")[1] || "png";
      files[name] = new File([blob], `${name}.${type === "jpeg" ? "jpg" : type}`, { type: blob.type });
    }
    return files;
  }

  async function useSettings(job) {
    const settings = sameSettings(job);
    const files = await inputFiles(job);
    let advanced = false;
    for (const field of state.fields) {
      if (field.kind === "file") {
        setImage(field, files[field.name] || null);
        continue;
      }
      const value = field.name in settings ? settings[field.name] : field.default;
      writeField(field, value);
      if (!$("#fields").contains(field.box) && JSON.stringify(value) !== JSON.stringify(field.default)) advanced = true;
    }
    if (advanced) $("#advanced").open = true;
    $("#form-error").textContent = "";
    const prompt = state.fields.find((field) => field.name === "prompt");
    $("#make").scrollIntoView({ block: "start" });
    if (prompt) prompt.input.focus();
  }

  async function poll() {
    clearTimeout(pollTimer);
    let busy = false;
    try {
      const { jobs, counts } = await apiJson("/v1/jobs?limit=100");
      setOnline(true);
      const seen = new Set();
      for (const job of jobs) {
        seen.add(job.id);
        upsert(job);
        busy = busy || !FINISHED.has(job.state);
      }
      for (const entry of [...state.jobs.values()]) if (!seen.has(entry.job.id)) forget(entry);
      order();
      $("#counts").textContent = Object.entries(counts).filter(([, count]) => count)
        .map(([name, count]) => `${count} ${name}`).join(" · ");
    } catch (problem) {
      setOnline(false);
    }
    pollTimer = setTimeout(poll, state.online === false ? 2000 : busy ? 1000 : 3000);
  }

  async function start() {
    // A file dropped beside the drop zones must not replace the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    $("#form").addEventListener("submit", generate);
    poll();
    for (;;) {
      try {
        await buildForm();
        return;
      } catch (problem) {
        $("#form-loading").textContent = problem instanceof TypeError
          ? "The server does not answer: trying again…" : `The settings cannot be read: ${problem.message}`;
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
  }

  start();
})();
