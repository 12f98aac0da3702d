// smsbatch dashboard: live fragments polled from the server, and every change made through the
// REST API under /v1/ (the session cookie goes along; the browser adds Origin and
// Sec-Fetch-Site, which the server checks). No library, no build step.
"use strict";
(() => {
  const pollMs = Number(document.body.dataset.pollMs) || 2000;
  const lastHtml = new WeakMap();

  // --- Messages to the person -------------------------------------------------------------
  let flashTimer = 0;
  function flash(text, ok) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.classList.toggle("ok", Boolean(ok));
    box.hidden = false;
    clearTimeout(flashTimer);
    if (ok) flashTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  function toLogin() {
    location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search));
  }

  // The API's error body, {"error": {"code", "message"}}, in words.
  async function problem(res) {
    if (res.status === 401) { toLogin(); return "Your session has ended: log in again."; }
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return "The server answered " + res.status + ".";
  }

  // A button at work says so and ignores further presses, but keeps the focus: a disabled
  // button would drop it, and someone on a keyboard would be sent back to the top of the page.
  function busy(button, on) {
    if (!button) return false;
    if (on && button.getAttribute("aria-disabled") === "true") return false;
    if (on) button.setAttribute("aria-disabled", "true");
    else button.removeAttribute("aria-disabled");
    return true;
  }

  async function api(method, path, body, type) {
    const init = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.body = type ? body : JSON.stringify(body);
      init.headers["Content-Type"] = type || "application/json";
    }
    return fetch(path, init);
  }

  // --- Live fragments -----------------------------------------------------------------------
  // An element with data-live="url" is replaced by that fragment every pollMs while the page is
  // visible; one with data-src="url" only when something changed it. Focus stays where it was.
  async function refresh(el) {
    const url = el.dataset.live || el.dataset.src;
    if (!url || el.dataset.busy) return;
    el.dataset.busy = "1";
    try {
      const res = await fetch(url, { credentials: "same-origin", headers: { "X-Fragment": "1" } });
      if (res.status === 401) { toLogin(); return; }
      if (!res.ok) return;
      const html = await res.text();
      if (lastHtml.get(el) === html) return;
      const active = document.activeElement;
      const inside = active && el.contains(active);
      const focusId = inside ? active.id : "";
      const batch = inside && active.dataset ? active.dataset.batch : "";
      el.innerHTML = html;
      lastHtml.set(el, html);
      if (inside) {
        // The same control, or (an action that the new state no longer offers) the first
        // action of the same batch.
        const again = (focusId && document.getElementById(focusId)) ||
          (batch && el.querySelector('button[data-batch="' + batch + '"]'));
        if (again) again.focus();
        else {
          // The control is gone (a removed row): the region keeps the focus, not the page's top.
          el.setAttribute("tabindex", "-1");
          el.focus({ preventScroll: true });
        }
      }
    } catch (_) {
      // The server is unreachable for a moment: the next poll tries again.
    } finally {
      delete el.dataset.busy;
    }
  }

  function refreshAll() {
    document.querySelectorAll("[data-live], [data-src]").forEach(refresh);
  }

  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    document.querySelectorAll("[data-live]").forEach(refresh);
  }, pollMs);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") document.querySelectorAll("[data-live]").forEach(refresh);
  });

  document.querySelectorAll("select[data-autosubmit]").forEach((select) => {
    select.addEventListener("change", () => select.form && select.form.requestSubmit());
  });

  // --- Lifecycle actions and resending ------------------------------------------------------
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const { action, batch, name } = button.dataset;
    if (action === "cancel" && !confirm("Cancel “" + name + "”? Messages not yet sent will not be sent.")) return;
    if (!busy(button, true)) return;
    try {
      if (action === "resend") {
        const res = await api("POST", "/v1/batches/" + batch + "/resend", { statuses: ["failed"] });
        if (res.status !== 201) { flash(await problem(res)); return; }
        const created = await res.json();
        location.assign("/ui/batches/" + created.id);
        return;
      }
      const res = await api("POST", "/v1/batches/" + batch + "/" + action);
      if (res.status !== 202) { flash(await problem(res)); return; }
      const after = await res.json();
      flash("“" + name + "” is " + after.state + ".", true);
    } catch (e) {
      flash("The request failed: " + e.message);
    } finally {
      busy(button, false);
      refreshAll();
    }
  });

  // --- CSV uploads with their progress -------------------------------------------------------
  function upload(path, file, progress, status) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.withCredentials = true;
      xhr.setRequestHeader("Content-Type", "text/csv");
      if (progress) { progress.hidden = false; progress.value = 0; }
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        const pct = Math.round((e.loaded * 100) / e.total);
        if (progress) progress.value = pct;
        if (status) status.textContent = "Uploading… " + pct + "%";
      };
      xhr.onload = () => {
        if (progress) progress.value = 100;
        resolve(new Response(xhr.responseText, { status: xhr.status }));
      };
      xhr.onerror = () => reject(new Error("the upload did not reach the server"));
      xhr.send(file);
    });
  }

  async function uploadRecipients(form, id) {
    const file = form.querySelector("input[type=file]").files[0];
    const status = form.querySelector("#upload-status");
    const res = await upload("/v1/batches/" + id + "/recipients", file,
      form.querySelector("progress"), status);
    if (res.status !== 200) throw new Error(await problem(res));
    const body = await res.json();
    if (status) status.textContent = "Uploaded: " + body.accepted + " rows, " + body.total + " recipients in all.";
    return body;
  }

  document.querySelectorAll("form[data-upload]").forEach((form) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      if (!busy(button, true)) return;
      try {
        await uploadRecipients(form, form.dataset.upload);
        flash("Recipients added.", true);
        refreshAll();
      } catch (e) {
        flash(e.message);
      } finally {
        busy(button, false);
      }
    });
  });

  // --- The new batch form --------------------------------------------------------------------
  const newBatch = document.querySelector("form[data-new-batch]");
  if (newBatch) {
    const field = (name) => newBatch.elements.namedItem(name);
    const preview = document.getElementById("preview");
    let previewTimer = 0;
    const updatePreview = () => {
      clearTimeout(previewTimer);
      previewTimer = setTimeout(async () => {
        const body = new URLSearchParams({ content: field("content").value, url: field("url").value });
        try {
          const res = await api("POST", "/ui/preview", body.toString(), "application/x-www-form-urlencoded");
          if (res.ok) preview.innerHTML = await res.text();
        } catch (_) { /* the next keystroke tries again */ }
      }, 200);
    };
    field("content").addEventListener("input", updatePreview);
    field("url").addEventListener("input", updatePreview);

    newBatch.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = newBatch.querySelector("button[type=submit]");
      const body = {
        name: field("name").value,
        content: field("content").value,
        provider: field("provider").value,
        message_type: newBatch.querySelector("input[name=message_type]:checked").value,
      };
      if (field("url").value) body.url = field("url").value;
      // datetime-local is the browser's local time: sent as the UTC instant it names.
      if (field("schedule_at").value) body.schedule_at = new Date(field("schedule_at").value).toISOString();
      if (!busy(button, true)) return;
      let id = "";
      try {
        const res = await api("POST", "/v1/batches", body);
        if (res.status !== 201) { flash(await problem(res)); return; }
        id = (await res.json()).id;
        if (field("csv").files.length) await uploadRecipients(newBatch, id);
        if (field("start").checked) {
          const started = await api("POST", "/v1/batches/" + id + "/start");
          if (started.status !== 202) throw new Error(await problem(started));
        }
        location.assign("/ui/batches/" + id);
      } catch (e) {
        // The batch exists; what failed after its creation is said on its own page too.
        flash(e.message + (id ? " The batch was created: open it from the list to try again." : ""));
      } finally {
        busy(button, false);
      }
    });
  }

  // --- Opt-outs ------------------------------------------------------------------------------
  const result = document.getElementById("opt-out-result");
  const said = (added) => "Added " + added.added + ", already listed " + added.already +
    ", not phone numbers " + added.invalid + ".";

  const addForm = document.querySelector("form[data-opt-out-add]");
  if (addForm) {
    addForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const phones = addForm.phones.value.split(/[\n,;]+/).map((p) => p.trim()).filter(Boolean);
      const res = await api("POST", "/v1/opt-outs", { phones });
      if (res.status !== 200) { flash(await problem(res)); return; }
      result.textContent = said(await res.json());
      addForm.reset();
      refreshAll();
    });
  }

  const importForm = document.querySelector("form[data-opt-out-import]");
  if (importForm) {
    importForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const res = await upload("/v1/opt-outs", importForm.csv.files[0], importForm.querySelector("progress"), result);
        if (res.status !== 200) { flash(await problem(res)); return; }
        result.textContent = said(await res.json());
        importForm.reset();
        refreshAll();
      } catch (e) {
        flash(e.message);
      }
    });
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-remove-opt-out]");
    if (!button) return;
    const phone = button.dataset.removeOptOut;
    if (!busy(button, true)) return;
    const res = await api("DELETE", "/v1/opt-outs/" + encodeURIComponent(phone));
    if (res.status !== 204) { flash(await problem(res)); busy(button, false); return; }
    result.textContent = phone + " is off the list.";
    refreshAll();
  });
})();
