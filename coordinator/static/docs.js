// The API documentation page: fetches this coordinator's OpenAPI description and renders
// every operation (summary, authentication, parameters, request body and responses, with
// the schemas' fields, types, constraints and descriptions). No dependencies, nothing
// loaded from elsewhere; the page's CSP allows this origin only.
"use strict";

(() => {
  const SPEC_URL = "/api/v1/openapi.json";
  const REF_PREFIX = "#/components/schemas/";
  const METHODS = ["get", "put", "post", "delete", "patch", "head", "options"];
  const MAX_DEPTH = 6;
  let spec = null;

  // el("td", {class: "x"}, "text", childNode, ...): a DOM node; strings become text nodes
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function refName(ref) {
    return ref.startsWith(REF_PREFIX) ? ref.slice(REF_PREFIX.length) : ref;
  }

  // the schema a $ref points to (components.schemas), or the schema itself
  function resolve(schema) {
    if (schema && schema.$ref) {
      const found = (spec.components && spec.components.schemas || {})[refName(schema.$ref)];
      return found || {};
    }
    return schema || {};
  }

  function members(schema) {
    return schema.anyOf || schema.oneOf || (schema.allOf && schema.allOf.length > 1 ? schema.allOf : null);
  }

  // a short type expression: "string", "integer | null", "array of TextPart", "ImageParams"
  function typeOf(schema) {
    if (!schema || Object.keys(schema).length === 0) return "any";
    if (schema.$ref) return refName(schema.$ref);
    if (schema.allOf && schema.allOf.length === 1) return typeOf(schema.allOf[0]);
    const parts = members(schema);
    if (parts) return parts.map(typeOf).join(schema.allOf ? " & " : " | ");
    if (schema.const !== undefined) return JSON.stringify(schema.const);
    const type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type;
    if (type === "array") return "array of " + typeOf(schema.items);
    if (type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
      return "object of string → " + typeOf(schema.additionalProperties);
    }
    if (schema.enum) return (type || "value") + " (enum)";
    if (schema.format) return (type || "string") + " (" + schema.format + ")";
    return type || "any";
  }

  const show = (value) => JSON.stringify(value);

  // constraints of a schema, and of its non-null alternatives (a nullable integer's bounds)
  function constraints(schema, out = []) {
    const s = schema || {};
    if (s.minimum !== undefined) out.push("≥ " + s.minimum);
    if (s.exclusiveMinimum !== undefined) out.push("> " + s.exclusiveMinimum);
    if (s.maximum !== undefined) out.push("≤ " + s.maximum);
    if (s.exclusiveMaximum !== undefined) out.push("< " + s.exclusiveMaximum);
    if (s.minLength !== undefined) out.push("min length " + s.minLength);
    if (s.maxLength !== undefined) out.push("max length " + s.maxLength);
    if (s.pattern !== undefined) out.push("pattern " + s.pattern);
    if (s.minItems !== undefined) out.push("min items " + s.minItems);
    if (s.maxItems !== undefined) out.push("max items " + s.maxItems);
    if (s.maxProperties !== undefined) out.push("max entries " + s.maxProperties);
    if (s.enum) out.push("one of " + s.enum.map(show).join(", "));
    if (s.format && (s.anyOf || s.oneOf)) out.push("format " + s.format);
    if (s.items && !s.items.$ref) {
      const each = constraints(s.items);
      if (each.length) out.push("each " + each.join(", "));
    }
    for (const part of s.anyOf || s.oneOf || s.allOf || []) {
      if (!part.$ref && part.type !== "null") constraints(part, out);
    }
    return out;
  }

  // the component schemas a field leads to (directly, as items, values or alternatives)
  function refsOf(schema, out = []) {
    if (!schema) return out;
    if (schema.$ref) out.push(refName(schema.$ref));
    for (const part of schema.anyOf || schema.oneOf || schema.allOf || []) refsOf(part, out);
    if (schema.items) refsOf(schema.items, out);
    if (schema.additionalProperties && typeof schema.additionalProperties === "object") {
      refsOf(schema.additionalProperties, out);
    }
    return out;
  }

  function nested(names, seen, depth) {
    return names
      .filter((name, i) => names.indexOf(name) === i && !seen.has(name))
      .map((name) => {
        const target = resolve({ $ref: REF_PREFIX + name });
        if (!target.properties) return null;
        const inner = new Set(seen).add(name);
        const body = depth >= MAX_DEPTH ? el("p", {}, "…") : schemaView(target, inner, depth + 1);
        return el("details", { class: "nested" }, el("summary", {}, name + " fields"), body);
      });
  }

  // a schema as a table of its fields (nested models expandable), or its type
  function schemaView(schema, seen = new Set(), depth = 0) {
    const name = schema && schema.$ref ? refName(schema.$ref) : null;
    if (name) seen = new Set(seen).add(name);
    const target = resolve(schema);
    const wrap = el("div", { class: "schema" });
    if (target.description && depth === 0) wrap.append(el("p", {}, target.description));
    if (!target.properties) {
      wrap.append(el("p", {}, "Type: ", el("span", { class: "type" }, typeOf(schema))));
      const limits = constraints(target);
      if (limits.length) wrap.append(el("p", { class: "constraints" }, limits.join("; ")));
      wrap.append(...nested(refsOf(target), seen, depth).filter(Boolean));
      return wrap;
    }
    const required = new Set(target.required || []);
    const rows = Object.entries(target.properties).map(([field, prop]) => {
      const limits = constraints(prop);
      if (prop.default !== undefined) limits.push("default " + show(prop.default));
      const description = prop.description || resolve(prop).description || "";
      return el(
        "tr",
        {},
        el("td", { class: "name" }, el("code", {}, field),
          required.has(field) ? el("span", { class: "required" }, "required") : null),
        el("td", { class: "type" }, typeOf(prop)),
        el("td", { class: "constraints" }, limits.join("; ")),
        el("td", {}, description, nested(refsOf(prop), seen, depth)),
      );
    });
    wrap.append(el("table", {},
      el("thead", {}, el("tr", {}, ["Field", "Type", "Constraints", "Description"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
    if (target.additionalProperties === false) {
      wrap.append(el("p", { class: "constraints" }, "Unknown fields are refused."));
    }
    return wrap;
  }

  function authText(op) {
    const security = op.security;
    if (!security || security.length === 0) return "No authentication";
    const schemes = (spec.components && spec.components.securitySchemes) || {};
    const optional = security.some((req) => Object.keys(req).length === 0);
    const ways = security.flatMap(Object.keys).map((key) => {
      const scheme = schemes[key] || {};
      if (scheme.type === "apiKey") return "the " + scheme.name + " " + scheme.in;
      if (scheme.type === "http") return "Authorization: " + (scheme.scheme === "bearer" ? "Bearer <key>" : scheme.scheme);
      return key;
    });
    return (optional ? "Optional: " : "Required: ") + ways.join(" or ");
  }

  function contentView(content) {
    return Object.entries(content || {}).map(([media, body]) =>
      el("div", {},
        el("p", {}, el("code", {}, media)),
        body.schema ? schemaView(body.schema) : null));
  }

  function operationView(path, method, op) {
    const id = "op-" + method + "-" + path.replace(/[^A-Za-z0-9]+/g, "-");
    const parts = [
      el("h3", {}, el("span", { class: "method " + method }, method.toUpperCase()),
        el("span", { class: "path" }, path)),
      el("p", { class: "summary" }, op.summary || ""),
      el("p", { class: "auth" }, authText(op)),
    ];
    if (op.parameters && op.parameters.length) {
      parts.push(el("h4", {}, "Parameters"), el("table", {},
        el("thead", {}, el("tr", {}, ["Name", "In", "Type", "Description"].map((h) => el("th", {}, h)))),
        el("tbody", {}, op.parameters.map((p) => el("tr", {},
          el("td", { class: "name" }, el("code", {}, p.name),
            p.required ? el("span", { class: "required" }, "required") : null),
          el("td", {}, p.in),
          el("td", { class: "type" }, typeOf(p.schema)),
          el("td", {}, p.description || ""))))));
    }
    if (op.requestBody) {
      parts.push(el("h4", {}, "Request body"), ...contentView(op.requestBody.content));
    }
    parts.push(el("h4", {}, "Responses"));
    for (const [code, response] of Object.entries(op.responses || {})) {
      const detail = el("details", {},
        el("summary", {}, el("span", { class: "status" }, code), " ", response.description || ""),
        ...contentView(response.content));
      if (code.startsWith("2")) detail.open = true;
      parts.push(detail);
    }
    const text = (method + " " + path + " " + (op.summary || "")).toLowerCase();
    return { id, method, path, text, node: el("section", { class: "op", id }, parts) };
  }

  const OTHER = "other";

  function groupOf(path) {
    if (path.startsWith("/v1/")) return "OpenAI-compatible";
    if (path.startsWith("/api/v2/")) return "AI Horde-compatible";
    const match = path.match(/^\/api\/v1\/([^/.]+)(\/|$)/);
    return match ? match[1] : OTHER;
  }

  function render() {
    document.title = spec.info.title + " " + spec.info.version;
    document.getElementById("title").textContent = spec.info.title;
    document.getElementById("version").textContent =
      "Version " + spec.info.version + " · OpenAPI " + spec.openapi;
    const main = document.getElementById("operations");
    const toc = document.getElementById("toc");
    main.replaceChildren();
    toc.replaceChildren();
    const groups = new Map();
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const method of METHODS) {
        if (!item[method]) continue;
        const group = groupOf(path);
        if (!groups.has(group)) groups.set(group, []);
        groups.get(group).push(operationView(path, method, item[method]));
      }
    }
    const entries = [];
    const ordered = [...groups].sort(([a], [b]) => (a === OTHER) - (b === OTHER));
    const headings = [];
    for (const [group, ops] of ordered) {
      const heading = el("h2", {}, group);
      headings.push({ heading, links: [] });
      toc.append(heading);
      for (const op of ops) {
        const link = el("a", { href: "#" + op.id, title: op.text },
          el("span", { class: "method " + op.method }, op.method.toUpperCase()), " ", op.path);
        toc.append(link);
        main.append(op.node);
        entries.push({ ...op, link });
        headings[headings.length - 1].links.push(link);
      }
    }
    const filter = document.getElementById("filter");
    filter.addEventListener("input", () => {
      const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      for (const entry of entries) {
        const hide = !words.every((word) => entry.text.includes(word));
        entry.node.classList.toggle("hidden", hide);
        entry.link.classList.toggle("hidden", hide);
      }
      for (const { heading, links } of headings) {
        heading.classList.toggle("hidden", links.every((link) => link.classList.contains("hidden")));
      }
    });
    if (location.hash) {
      const target = document.getElementById(location.hash.slice(1));
      if (target) target.scrollIntoView();
    }
  }

  async function load() {
    const status = document.getElementById("status");
    try {
      const response = await fetch(SPEC_URL, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(SPEC_URL + " answered " + response.status);
      spec = await response.json();
      render();
    } catch (error) {
      status.textContent = "Could not load the API description: " + error.message;
      status.classList.add("error");
    }
  }

  document.addEventListener("DOMContentLoaded", load);
})();
