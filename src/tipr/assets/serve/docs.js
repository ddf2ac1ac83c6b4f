"use strict";
// Lists the routes of /openapi.json; works offline (no Swagger UI from a CDN).
fetch("/openapi.json", { credentials: "same-origin" }).then((r) => r.json()).then((spec) => {
  const main = document.getElementById("api");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const h = document.createElement("h3");
      h.textContent = `${method.toUpperCase()} ${path}`;
      const p = document.createElement("p");
      p.textContent = op.summary || "";
      const params = (op.parameters || []).map((x) => `${x.name} (${x.in})`).join(", ");
      const q = document.createElement("p");
      q.textContent = params ? `parameters: ${params}` : "";
      main.append(h, p, q);
    }
  }
});
