// Keyboard shortcuts for the labeling form (progressive enhancement: every action also works without JS).
// Bound once on the document, so it keeps working when htmx swaps the page body.
(function () {
  "use strict";
  function form() { return document.getElementById("judge"); }
  function check(name, value) {
    var el = form().querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (el) { el.checked = true; el.dispatchEvent(new Event("change", { bubbles: true })); }
    return !!el;
  }
  function submit() { var f = form(); if (f.requestSubmit) { f.requestSubmit(); } else { f.submit(); } }
  function activeIndex() {
    var a = form().querySelector(".rankable.active");
    return a ? parseInt(a.getAttribute("data-index"), 10) : 0;
  }
  function setActive(i) {
    var cards = form().querySelectorAll(".rankable");
    if (!cards.length) return;
    i = (i + cards.length) % cards.length;
    cards.forEach(function (c) { c.classList.remove("active"); });
    cards[i].classList.add("active");
    cards[i].scrollIntoView({ block: "nearest" });
  }
  // steps: rate the highlighted step, move between steps, "first error"; submit only once every step is rated
  var STEP_KEYS = { g: "good", "1": "good", "+": "good", n: "neutral", "2": "neutral", "0": "neutral",
                    b: "bad", "3": "bad", "-": "bad" };
  function steps() { return form().querySelectorAll("li.step"); }
  function activeStep() {
    var a = form().querySelector("li.step.active");
    return a ? parseInt(a.getAttribute("data-index"), 10) : 0;
  }
  function setStep(i, focus) {
    var items = steps();
    if (!items.length) return;
    i = Math.max(0, Math.min(items.length - 1, i));
    items.forEach(function (c) { c.classList.remove("active"); });
    items[i].classList.add("active");
    if (focus) { items[i].focus({ preventScroll: true }); }
    items[i].scrollIntoView({ block: "nearest" });
  }
  function stepValue(i) {
    var el = form().querySelector('input[name="step_' + i + '"]:checked');
    return el ? el.value : null;
  }
  function rateStep(i, value) {
    if (check("step_" + i, value)) { var li = document.getElementById("step-" + i); if (li) li.classList.remove("missing"); }
  }
  function firstError(i) {  // step i and every later step bad; earlier unrated steps good (rated ones are kept)
    var n = steps().length;
    for (var j = 0; j < n; j++) {
      if (j >= i) rateStep(j, "bad");
      else if (stepValue(j) === null) rateStep(j, "good");
    }
    setStep(i, true);
  }
  function unratedSteps() {
    var out = [], n = steps().length;
    for (var j = 0; j < n; j++) { if (stepValue(j) === null) out.push(j); }
    return out;
  }
  function submitSteps() {  // every step rated, else point at the first unrated one (the server checks it too)
    var missing = unratedSteps(), msg = document.getElementById("steps-missing");
    if (!missing.length) { submit(); return; }
    missing.forEach(function (j) { document.getElementById("step-" + j).classList.add("missing"); });
    if (msg) {
      msg.textContent = "Rate every step first: " + missing.map(function (j) { return "step " + (j + 1); }).join(", ") +
        (missing.length === 1 ? " is" : " are") + " not rated.";
      msg.hidden = false;
    }
    setStep(missing[0], true);
  }
  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("button.first-error");
    if (!b || !form()) return;
    e.preventDefault();  // with JS the shortcut only marks the steps; without JS the button submits it
    firstError(parseInt(b.value, 10));
  });
  document.addEventListener("keydown", function (e) {
    var f = form();
    if (!f || e.altKey || e.metaKey) return;
    var t = e.target, tag = (t && t.tagName) || "";
    var typing = tag === "TEXTAREA" || (tag === "INPUT" && /^(text|password|number|search|email)$/.test(t.type));
    if (typing) {  // Ctrl+Enter from the comment box: the same checks as Enter (a steps page: every step rated)
      if (e.key === "Enter" && e.ctrlKey) {
        e.preventDefault();
        if (f.getAttribute("data-task") === "steps") { submitSteps(); } else { submit(); }
      }
      else if (e.key === "Escape") { t.blur(); }
      return;
    }
    if (e.ctrlKey) return;
    var task = f.getAttribute("data-task"), key = e.key, low = key.toLowerCase(), done = false;
    if (key === "Enter") { e.preventDefault(); if (task === "steps") { submitSteps(); } else { submit(); } return; }
    if (low === "s") { var sk = document.getElementById("skip"); if (sk) { e.preventDefault(); sk.click(); } return; }
    if (task === "pairwise") {
      if (low === "a" || key === "ArrowLeft") done = check("choice", "left");
      else if (low === "b" || key === "ArrowRight") done = check("choice", "right");
      else if (low === "t") done = check("choice", "tie");
      else if (low === "x") done = check("choice", "both_bad");
      else if (/^[1-4]$/.test(key)) {
        var names = ["significantly_better", "better", "slightly_better", "negligibly_better"];
        done = check("strength", names[parseInt(key, 10) - 1]);
      }
    } else if (task === "rank") {
      var k = parseInt(f.getAttribute("data-k"), 10);
      if (/^[1-9]$/.test(key) && parseInt(key, 10) <= k) {
        var i = activeIndex(), sel = document.getElementById("rank_" + i);
        if (sel) { sel.value = key; done = true; setActive(i + 1); }
      } else if (low === "j" || key === "ArrowDown") { setActive(activeIndex() + 1); done = true; }
      else if (low === "k" || key === "ArrowUp") { setActive(activeIndex() - 1); done = true; }
    } else if (task === "thumbs") {
      if (low === "u" || key === "+") done = check("thumbs", "up");
      else if (low === "d" || key === "-") done = check("thumbs", "down");
      else if (low === "c") { document.getElementById("comment").focus(); done = true; }
    } else if (task === "steps") {
      var cur = activeStep(), n = steps().length;
      if (STEP_KEYS.hasOwnProperty(low)) { rateStep(cur, STEP_KEYS[low]); if (cur + 1 < n) setStep(cur + 1, true); done = true; }
      else if (low === "f") { firstError(cur); done = true; }
      else if (low === "a") { unratedSteps().forEach(function (j) { rateStep(j, "good"); }); done = true; }
      else if (low === "j" || key === "ArrowDown") { setStep(cur + 1, true); done = true; }
      else if (low === "k" || key === "ArrowUp") { setStep(cur - 1, true); done = true; }
    } else if (task === "likert") {
      if (/^[1-7]$/.test(key)) done = check("likert", key);
      else {
        var box = f.querySelector('input[name="flags"][data-key="' + low + '"]');
        if (box) { box.checked = !box.checked; done = true; }
      }
    }
    if (done) e.preventDefault();
  });
  document.addEventListener("focusin", function (e) {
    var card = e.target.closest && e.target.closest(".rankable");
    if (card) setActive(parseInt(card.getAttribute("data-index"), 10));
    var step = e.target.closest && e.target.closest("li.step");
    if (step) setStep(parseInt(step.getAttribute("data-index"), 10), false);
  });
})();
