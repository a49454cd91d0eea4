// skinml demo page. Plain JS, no dependencies. Every text that comes from the model, the
// knowledge base or the user is inserted with textContent (never innerHTML), so a value such as
// "<img src=x onerror=...>" is shown as text and runs nothing.
"use strict";

(function () {
  const state = { photo: null, schema: null, previewUrl: null };

  function el(tag, options, children) {
    const node = document.createElement(tag);
    const o = options || {};
    if (o.className) node.className = o.className;
    if (o.text !== undefined && o.text !== null) node.textContent = String(o.text);
    if (o.attrs) for (const [k, v] of Object.entries(o.attrs)) node.setAttribute(k, String(v));
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function $(id) { return document.getElementById(id); }
  function pct(p) { return (100 * p).toFixed(1) + "%"; }

  // -- questionnaire -------------------------------------------------------------------
  function buildForm(schema) {
    const box = $("questions");
    clear(box);
    $("schema-note").textContent = schema.note || "";
    for (const group of schema.groups) {
      const fieldset = el("fieldset", {}, [el("legend", { text: group })]);
      for (const f of schema.fields.filter((x) => x.group === group)) {
        const id = "field-" + f.name;
        let input;
        if (f.type === "choice") {
          input = el("select", { attrs: { id: id, name: f.name } }, [el("option", { text: "not answered", attrs: { value: "" } })]);
          for (const c of f.choices) input.appendChild(el("option", { text: c.label, attrs: { value: c.value } }));
        } else {
          // Numbers are typed as text on purpose: the model validates them and its 400 names the field.
          const hint = f.type === "number" ? `${f.minimum}-${f.maximum}${f.unit ? " " + f.unit : ""}` : "";
          input = el("input", { attrs: { id: id, name: f.name, type: "text", inputmode: "decimal", placeholder: hint, autocomplete: "off" } });
        }
        const label = el("label", { text: f.label + (f.unit ? ` (${f.unit})` : ""), attrs: { for: id } });
        fieldset.appendChild(el("div", { className: "field" }, [label, input, el("p", { className: "error", attrs: { id: "err-" + f.name, role: "alert" } })]));
      }
      box.appendChild(fieldset);
    }
    const d = schema.decision || {};
    const parts = [];
    if (d.referral_threshold !== null && d.referral_threshold !== undefined) {
      parts.push(`referral when P(BCC)+P(SCC)+P(MEL) >= ${d.referral_threshold.toFixed(3)} (chosen on validation for ${pct(d.target_sensitivity)} malignant sensitivity)`);
    } else {
      parts.push("no referral threshold calibrated");
    }
    if (d.uncertainty_top_probability !== null && d.uncertainty_entropy !== null) {
      parts.push(`unsure when top probability < ${Number(d.uncertainty_top_probability).toFixed(2)} or normalised entropy > ${Number(d.uncertainty_entropy).toFixed(2)}`);
    }
    if (!d.calibrated) parts.push("NOT calibrated on validation predictions");
    $("thresholds").textContent = parts.join("; ") + ".";
    if (schema.no_generated_text) $("no-generated-text").textContent = schema.no_generated_text;
    if (schema.notice) $("notice").textContent = schema.notice;
  }

  // -- photo ---------------------------------------------------------------------------
  function setPhoto(file) {
    $("err-image").textContent = "";
    if (!file) return;
    if (!/^image\/(png|jpeg)$/.test(file.type)) {
      $("err-image").textContent = `"${file.name}" is not a PNG or JPEG photo.`;
      return;
    }
    state.photo = file;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);  // shown from memory; nothing is uploaded yet
    $("photo-preview").src = state.previewUrl;
    $("photo-view").hidden = false;
    $("heatmap").hidden = true;
    $("heatmap-controls").hidden = true;
  }

  function wirePhoto() {
    const zone = $("dropzone");
    $("photo-input").addEventListener("change", (e) => setPhoto(e.target.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("dragover"); });
    }
    for (const name of ["dragleave", "drop"]) {
      zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("dragover"); });
    }
    zone.addEventListener("drop", (e) => {
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) setPhoto(file);
    });
    $("heatmap-opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = String(e.target.value / 100); });
  }

  // -- errors --------------------------------------------------------------------------
  function clearErrors() {
    for (const node of document.querySelectorAll(".error")) node.textContent = "";
    for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  }

  function showError(message, field) {
    const target = field ? $("err-" + field) : null;
    if (target) {
      target.textContent = message;
      const input = $("field-" + field);
      if (input) { input.classList.add("invalid"); input.focus(); }
      else if (field === "image") $("dropzone").focus();
    } else {
      $("err-general").textContent = message;
    }
  }

  // -- result --------------------------------------------------------------------------
  function renderResult(r) {
    const referral = $("referral");
    clear(referral);
    referral.className = "referral " + (r.referral.refer === true ? "refer" : r.referral.refer === false ? "no-refer" : "off");
    referral.appendChild(el("span", { text: r.referral.message }));

    const unc = $("uncertainty");
    unc.className = "uncertainty" + (r.uncertainty.uncertain ? " unsure" : "");
    const why = r.uncertainty.reasons.length ? ` (${r.uncertainty.reasons.join("; ")})` : "";
    unc.textContent = r.uncertainty.message + why;

    const list = $("top-list");
    clear(list);
    for (const t of r.top) {
      const bar = el("div", { className: "bar" + (t.malignant ? " malignant" : ""), attrs: { role: "presentation" } });
      bar.style.width = Math.max(0, Math.min(100, 100 * t.probability)).toFixed(1) + "%";
      const track = el("div", { className: "bar-track", attrs: { role: "meter", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": (100 * t.probability).toFixed(1), "aria-label": t.name } }, [bar]);
      list.appendChild(el("li", { className: "diagnosis" }, [
        el("div", {}, [el("span", { className: "name", text: t.name }), el("span", { className: "code", text: t.label + (t.malignant ? " (skin cancer)" : "") })]),
        track, el("span", { className: "pct", text: pct(t.probability) }),
      ]));
    }

    const imputed = $("imputed");
    clear(imputed);
    const labels = {};
    for (const f of (state.schema ? state.schema.fields : [])) labels[f.name] = f.label;
    for (const name of r.imputed_fields) imputed.appendChild(el("li", { text: labels[name] || name, attrs: { title: name } }));
    if (!r.imputed_fields.length) imputed.appendChild(el("li", { text: "none: every field was answered" }));

    const warnings = $("warnings");
    clear(warnings);
    for (const w of r.warnings) warnings.appendChild(el("li", { text: w }));
    $("warnings-block").hidden = !r.warnings.length;

    renderExplanation(r.explanation);
    renderNotes(r);
    $("result").hidden = false;
    $("result").scrollIntoView({ block: "start" });
  }

  function renderExplanation(x) {
    const overlay = $("heatmap");
    const hasOverlay = !!(x && typeof x.overlay_png_base64 === "string" && /^[A-Za-z0-9+/=]+$/.test(x.overlay_png_base64));
    overlay.hidden = !hasOverlay;
    $("heatmap-controls").hidden = !hasOverlay;
    if (hasOverlay) {
      overlay.src = "data:image/png;base64," + x.overlay_png_base64;
      overlay.style.opacity = String($("heatmap-opacity").value / 100);
      $("heatmap-method").textContent = x.method ? `method: ${x.method}` : "";
    } else {
      overlay.removeAttribute("src");
    }
    // Answers left at the baseline contribute exactly 0; show the largest movers only.
    const rows = ((x && x.metadata_contributions) || []).filter((c) => Number(c.contribution) !== 0)
      .sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution)).slice(0, 8);
    const body = document.querySelector("#contributions tbody");
    clear(body);
    for (const c of rows) {
      body.appendChild(el("tr", {}, [
        el("td", { text: c.field }), el("td", { text: c.value === null || c.value === undefined ? "(imputed)" : c.value }),
        el("td", { text: (c.contribution >= 0 ? "+" : "") + Number(c.contribution).toFixed(4) }),
        el("td", { text: `${c.contribution >= 0 ? "towards" : "against"} ${c.towards}` }),
      ]));
    }
    $("contributions-block").hidden = !rows.length;
    const target = x && x.target ? ` to the probability of ${x.target}` : "";
    $("contributions-note").textContent = x && x.baseline ? `Contributions${target}, relative to the baseline: ${x.baseline}` : "";
  }

  function renderNotes(r) {
    const box = $("notes");
    clear(box);
    for (const n of r.notes) {
      const cites = el("ol", { className: "citations" });
      for (const c of n.citations) {
        const li = el("li", { className: "citation" });
        if (/^https?:\/\//.test(c.url)) {
          li.appendChild(el("a", { text: c.title, attrs: { href: c.url, rel: "noopener noreferrer", target: "_blank" } }));
        } else {
          li.appendChild(el("span", { text: c.title }));
        }
        li.appendChild(el("span", { text: `. ${c.publisher}. ` }));
        li.appendChild(el("span", { className: "licence", text: `Licence: ${c.licence}` }));
        cites.appendChild(li);
      }
      box.appendChild(el("article", { className: "note" }, [
        el("div", { className: "condition", text: n.condition_name }),
        el("h3", { text: n.title }), el("p", { text: n.text }),
        el("div", { className: "muted", text: "Sources:" }), cites,
      ]));
    }
    if (r.no_generated_text) $("no-generated-text").textContent = r.no_generated_text;
    $("notes-section").hidden = !r.notes.length;
  }

  // -- submit --------------------------------------------------------------------------
  async function submit(e) {
    e.preventDefault();
    clearErrors();
    const data = new FormData();
    if (state.photo) data.append("image", state.photo, state.photo.name || "photo");
    for (const f of state.schema.fields) {
      const value = $("field-" + f.name).value;
      if (value !== "") data.append(f.name, value);
    }
    data.append("explain", "true");
    const button = $("submit");
    button.disabled = true;
    $("status").textContent = "Scoring...";
    try {
      const response = await fetch("/api/predict", { method: "POST", body: data });
      let body = null;
      try { body = await response.json(); } catch (_) { body = null; }
      if (!response.ok) {
        showError((body && body.error) || `The server answered HTTP ${response.status}.`, body && body.field);
        $("status").textContent = "Not scored: see the message above.";
        return;
      }
      renderResult(body);
      $("status").textContent = "Scored.";
    } catch (err) {
      showError(`Could not reach the app: ${err}`);
      $("status").textContent = "";
    } finally {
      button.disabled = false;
    }
  }

  async function start() {
    wirePhoto();
    $("lesion-form").addEventListener("submit", submit);
    try {
      const [schema, health] = await Promise.all([fetch("/api/schema").then((r) => r.json()), fetch("/api/health").then((r) => r.json())]);
      state.schema = schema;
      buildForm(schema);
      $("model-name").textContent = `${health.model} (${health.mode})`;
      document.body.dataset.ready = "true";
    } catch (err) {
      showError(`Could not load the questionnaire: ${err}`);
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
