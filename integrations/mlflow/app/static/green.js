// green-mlops dashboard: sortable tables and choices that apply at once. Everything works
// without it (the server renders the pages; the form has a button when script is off).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table.sortable")) {
    const headers = [...table.tHead.rows[0].cells];
    headers.forEach((th, column) => {
      th.querySelector("button.sort").addEventListener("click", () => {
        const ascending = th.getAttribute("aria-sort") !== "ascending";
        headers.forEach((h) => h.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const body = table.tBodies[0];
        const key = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent;
        const rows = [...body.rows];
        const numeric = rows.every((r) => key(r) === "" || !Number.isNaN(Number(key(r))));
        rows.sort((a, b) => {
          const [x, y] = [key(a), key(b)];
          if (x === "" || y === "") return x === y ? 0 : x === "" ? 1 : -1; // absent last
          const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
          return ascending ? order : -order;
        });
        body.append(...rows);
      });
    });
  }
  for (const select of document.querySelectorAll("form#choose select.auto")) {
    select.addEventListener("change", () => select.form.submit());
  }
});
