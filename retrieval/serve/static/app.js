// clipfind pages: image upload (file, drag-and-drop, paste), keyboard navigation, run progress.
// No dependencies, no network beyond this server.
"use strict";

function uploadAndSearch(file) {
  const form = document.getElementById("search");
  if (!form || !file) return;
  const drop = document.getElementById("drop");
  if (drop) drop.textContent = "uploading " + file.name + " …";
  fetch("/api/upload", {method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}})
    .then(r => r.json().then(body => ({ok: r.ok, body})))
    .then(({ok, body}) => {
      if (!ok) throw new Error(body.error || "upload refused");
      const input = document.createElement("input");
      input.type = "hidden"; input.name = "upload"; input.value = body.upload;
      form.appendChild(input);
      form.submit();
    })
    .catch(err => { if (drop) { drop.textContent = "upload failed: " + err.message; drop.classList.add("error"); } });
}

function setUpUploads() {
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  if (file) file.addEventListener("change", () => uploadAndSearch(file.files[0]));
  if (!drop) return;
  ["dragenter", "dragover"].forEach(kind => drop.addEventListener(kind, e => { e.preventDefault(); drop.classList.add("over"); }));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) uploadAndSearch(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", e => {
    const item = [...(e.clipboardData || {items: []}).items].find(i => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); uploadAndSearch(item.getAsFile()); }
  });
}

// Arrow keys move between results (row-aware), Enter opens one, "/" goes to the search box.
function setUpKeys() {
  document.addEventListener("keydown", e => {
    const box = document.getElementById("q");
    if (e.key === "/" && box && document.activeElement !== box) { e.preventDefault(); box.focus(); box.select(); return; }
    if (!["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].includes(e.key)) return;
    if (document.activeElement && ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) {
      if (e.key !== "ArrowDown" || document.activeElement !== box) return;
    }
    const hits = [...document.querySelectorAll(".grid a.hit")];
    if (!hits.length) return;
    e.preventDefault();
    const at = hits.indexOf(document.activeElement);
    if (at < 0) { hits[0].focus(); return; }
    const top = hits[at].offsetTop;
    const perRow = Math.max(1, hits.filter(h => h.offsetTop === top).length);
    const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow}[e.key];
    const next = hits[Math.min(hits.length - 1, Math.max(0, at + step))];
    next.focus();
    next.scrollIntoView({block: "nearest"});
  });
}

// Forms with data-job start a run through the JSON API and poll its progress until it ends.
function setUpJobs() {
  document.querySelectorAll("form[data-job]").forEach(form => {
    form.addEventListener("submit", e => {
      e.preventDefault();
      const out = form.querySelector("output");
      const data = new FormData(form);
      const body = form.dataset.job === "index" ? {folders: [data.get("folders")]} : {labels: data.get("labels")};
      out.textContent = "starting…";
      fetch("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
        .then(r => r.json().then(b => ({ok: r.ok, b})))
        .then(({ok, b}) => { if (!ok) throw new Error(b.error); poll(b.id, out); })
        .catch(err => { out.textContent = "refused: " + err.message; out.className = "progress error"; });
    });
  });
}

function poll(id, out) {
  fetch("/api/jobs/" + id).then(r => r.json()).then(job => {
    out.dataset.state = job.state;
    if (job.state === "running") {
      out.textContent = `${job.kind} run: ${job.elapsed_s} s, ${job.new_images} new images so far`;
      setTimeout(() => poll(id, out), 500);
    } else if (job.state === "done") {
      out.textContent = `${job.kind} run done in ${job.elapsed_s} s: ${job.new_images} new images`;
      setTimeout(() => location.reload(), 300);
    } else {
      out.textContent = `${job.kind} run failed: ${job.error}`;
      out.className = "progress error";
    }
  }).catch(() => setTimeout(() => poll(id, out), 1000));
}

document.addEventListener("DOMContentLoaded", () => { setUpUploads(); setUpKeys(); setUpJobs(); });
