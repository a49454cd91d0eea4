// Lists the app's OpenAPI description as text (textContent only; no external scripts).
"use strict";
document.addEventListener("DOMContentLoaded", async () => {
  const box = document.getElementById("endpoints");
  const spec = await fetch("/openapi.json").then((r) => r.json());
  while (box.firstChild) box.removeChild(box.firstChild);
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const section = document.createElement("section");
      section.className = "note";
      const h = document.createElement("h3");
      h.textContent = `${method.toUpperCase()} ${path}`;
      const p = document.createElement("p");
      p.textContent = op.summary || "";
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify({ requestBody: op.requestBody, responses: op.responses }, null, 2);
      section.append(h, p, pre);
      box.appendChild(section);
    }
  }
});
