// Form errors: the API's message beside the form, each field's problem beside its input.

import { ApiError } from "./api.js";

export function clearErrors(form, errorBox) {
  for (const small of form.querySelectorAll(".field-error")) small.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  if (errorBox) errorBox.textContent = "";
}

/** `error` (an ApiError names the fields) on `form`, its message in `errorBox`. */
export function showError(form, errorBox, error) {
  clearErrors(form, errorBox);
  const message = error instanceof ApiError ? error.message : `Something went wrong: ${error.message || error}`;
  if (error instanceof ApiError) {
    for (const { field: path, message: problem } of error.fields) {
      // a path into a list field (loras[0].model) is shown at the list's input
      let field = path;
      let small = form.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`);
      if (!small) {
        field = path.split(/[.[]/)[0];
        small = form.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`);
      }
      if (!small) continue;
      small.textContent = problem;
      const input = form.elements.namedItem(field);
      if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
    }
  }
  errorBox.textContent = message;
}

/** Mark `field` of `form` with `problem` (a check made before asking the API). */
export function fieldProblem(form, field, problem) {
  const small = form.querySelector(`.field-error[data-field="${field}"]`);
  if (small) small.textContent = problem;
  form.elements.namedItem(field)?.setAttribute("aria-invalid", "true");
}
