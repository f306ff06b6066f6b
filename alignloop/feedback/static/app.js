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
  // several questions (pairwise): the keys answer the highlighted question; an answered one moves on to the next
  // unanswered; Enter submits only when every question is answered (else it names the missing ones)
  var STRENGTH_NAMES = ["significantly_better", "better", "slightly_better", "negligibly_better"];
  function questions() { return form().querySelectorAll("section.question"); }
  function activeQuestion() {
    var a = form().querySelector("section.question.active");
    return a ? parseInt(a.getAttribute("data-index"), 10) : 0;
  }
  function setQuestion(i, focus) {
    var qs = questions();
    if (!qs.length) return;
    i = Math.max(0, Math.min(qs.length - 1, i));
    qs.forEach(function (q) { q.classList.remove("active"); });
    qs[i].classList.add("active");
    if (focus) { qs[i].focus({ preventScroll: true }); }
    qs[i].scrollIntoView({ block: "nearest" });
  }
  function strengthRequired() { return form().getAttribute("data-strength-required") !== "0"; }
  function picked(name) {
    var el = form().querySelector('input[name="' + name + '"]:checked');
    return el ? el.value : null;
  }
  function missingOf(q) {  // what question q still lacks: "a choice", "how much better", or null (answered)
    var n = q.getAttribute("data-name"), c = picked("choice_" + n);
    if (c === null) return "a choice";
    if ((c === "left" || c === "right") && strengthRequired() && picked("strength_" + n) === null) {
      return "how much better";
    }
    return null;
  }
  function answer(field, value) {  // answer the highlighted question; once answered, on to the next unanswered
    var qs = questions(), i = activeQuestion(), q = qs[i];
    if (!check(field + "_" + q.getAttribute("data-name"), value)) return false;
    if (missingOf(q) !== null) return true;
    q.classList.remove("missing");
    for (var j = 1; j <= qs.length; j++) {
      var k = (i + j) % qs.length;
      if (missingOf(qs[k]) !== null) { setQuestion(k, true); return true; }
    }
    return true;
  }
  function submitQuestions() {
    var qs = questions(), missing = [], msg = document.getElementById("questions-missing");
    qs.forEach(function (q, i) {
      var m = missingOf(q);
      if (m !== null) { missing.push([i, q.getAttribute("data-title") + " (" + m + ")"]); q.classList.add("missing"); }
    });
    if (!missing.length) { submit(); return; }
    if (msg) {
      msg.textContent = "Answer every question first: " + missing.map(function (m) { return m[1]; }).join("; ") + ".";
      msg.hidden = false;
    }
    setQuestion(missing[0][0], true);
  }
  function submitChecked() {  // Enter (and Ctrl+Enter in the comment): the page's own completeness check first
    var task = form().getAttribute("data-task");
    if (task === "steps") { submitSteps(); } else if (questions().length) { submitQuestions(); } else { submit(); }
  }
  function pairwiseKey(key, low) {
    var multi = questions().length > 0, set = multi ? answer : check;
    if (low === "a" || key === "ArrowLeft") return set("choice", "left");
    if (low === "b" || key === "ArrowRight") return set("choice", "right");
    if (low === "t") return set("choice", "tie");
    if (low === "x") return set("choice", "both_bad");
    if (/^[1-4]$/.test(key)) return set("strength", STRENGTH_NAMES[parseInt(key, 10) - 1]);
    if (multi && (low === "j" || key === "ArrowDown")) { setQuestion(activeQuestion() + 1, true); return true; }
    if (multi && (low === "k" || key === "ArrowUp")) { setQuestion(activeQuestion() - 1, true); return true; }
    return false;
  }
  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("button.first-error");
    if (!b || !form()) return;
    e.preventDefault();  // with JS the shortcut only marks the steps; without JS the button submits it
    firstError(parseInt(b.value, 10));
  });
  // Enter submits the judgement unless the focus is on a control that has an Enter action of its own: a button, a
  // link, a <summary> do that (Skip focused + Enter skips; it never stores a judgement); on the page itself, a
  // choice or the raw-text switch Enter submits
  function enterSubmits(t) {
    if (!t || t === document.body || t === document.documentElement) return true;
    var tag = t.tagName;
    if (tag === "BUTTON" || tag === "A" || tag === "SUMMARY") return false;
    return !(tag === "INPUT" && /^(submit|button|reset|image)$/.test(t.type));
  }
  function flagBox(low) {  // the Likert flag whose key is `low` (compared, not put into a selector: `"` is a key too)
    var boxes = form().querySelectorAll('input[name="flags"]');
    for (var i = 0; i < boxes.length; i++) { if (boxes[i].getAttribute("data-key") === low) return boxes[i]; }
    return null;
  }
  function pageKey(low) {  // keys of every page, after the task's own: undo, the raw-text switch
    var undo = document.getElementById("undo"), raw = document.getElementById("raw-toggle");
    if (undo && low === undo.getAttribute("data-key")) { if (!repeatKey) undo.click(); return true; }  // held key: once
    if (raw && low === "r") { raw.checked = !raw.checked; raw.dispatchEvent(new Event("change", { bubbles: true })); return true; }
    return false;
  }
  var repeatKey = false;  // the current keydown is an auto-repeat (a held key)
  document.addEventListener("keydown", function (e) {
    var f = form();
    repeatKey = !!e.repeat;
    if (e.altKey || e.metaKey) return;
    var t = e.target, tag = (t && t.tagName) || "";
    var typing = tag === "TEXTAREA" || (tag === "INPUT" && /^(text|password|number|search|email)$/.test(t.type));
    if (!f) {  // the "all done" page: only its Undo key
      var undo = document.getElementById("undo");
      if (undo && !typing && !e.ctrlKey && e.key.toLowerCase() === undo.getAttribute("data-key")) {
        e.preventDefault(); if (!e.repeat) undo.click();
      }
      return;
    }
    if (typing) {  // Ctrl+Enter from the comment box: the same checks as Enter (a steps page: every step rated)
      if (e.key === "Enter" && e.ctrlKey) { e.preventDefault(); submitChecked(); }
      else if (e.key === "Escape") { t.blur(); }
      return;
    }
    if (e.ctrlKey) return;
    var task = f.getAttribute("data-task"), key = e.key, low = key.toLowerCase(), done = false;
    if (key === "Enter") { if (enterSubmits(t)) { e.preventDefault(); submitChecked(); } return; }
    if (low === "s") { var sk = document.getElementById("skip"); if (sk) { e.preventDefault(); sk.click(); } return; }
    if (task === "pairwise") {
      done = pairwiseKey(key, low);
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
    } else if (task === "demonstration") {
      if (low === "w" || low === "e") { focusWriting(); done = true; }
    } else if (task === "likert") {
      if (/^[1-7]$/.test(key)) done = check("likert", key);
      else {
        var box = flagBox(low);
        if (box) { box.checked = !box.checked; done = true; }
      }
    }
    if (!done) done = pageKey(low);
    if (done) e.preventDefault();
  });
  // demonstrations: the response box (focused on load, caret at the end), its live count against the project's
  // minimum, and "start from scratch" / "restore original" for an edited sampled answer
  function writing() { return document.getElementById("demo-text"); }
  function focusWriting() {
    var t = writing();
    if (!t) return;
    t.focus();
    t.setSelectionRange(t.value.length, t.value.length);
  }
  function countChars() {
    var t = writing(), out = document.getElementById("char-count");
    if (!t || !out) return;
    var n = t.value.trim().length, min = parseInt(t.getAttribute("data-min"), 10) || 0;
    out.textContent = n + " characters · " + (n < min ? "at least " + min + " (" + (min - n) + " more)" : "at least " + min + " ✓");
    out.classList.toggle("short", n < min);
  }
  function setWriting(text) {
    var t = writing();
    if (!t) return;
    t.value = text;
    countChars();
    focusWriting();
  }
  document.addEventListener("input", function (e) { if (e.target.id === "demo-text") countChars(); });
  document.addEventListener("click", function (e) {
    var id = e.target && e.target.id;
    if (id === "demo-clear") { setWriting(""); }
    else if (id === "demo-restore") { var o = document.getElementById("original-text"); if (o) setWriting(o.value); }
  });
  document.addEventListener("change", function (e) {  // a question answered with the mouse is no longer missing
    if (e.target.id === "raw-toggle") remember(RAW_KEY, e.target.checked ? "1" : "0");
    var q = e.target.closest && e.target.closest("section.question");
    if (q && missingOf(q) === null) q.classList.remove("missing");
  });
  document.addEventListener("focusin", function (e) {
    var card = e.target.closest && e.target.closest(".rankable");
    if (card) setActive(parseInt(card.getAttribute("data-index"), 10));
    var step = e.target.closest && e.target.closest("li.step");
    if (step) setStep(parseInt(step.getAttribute("data-index"), 10), false);
    var q = e.target.closest && e.target.closest("section.question");
    if (q) setQuestion(parseInt(q.getAttribute("data-index"), 10), false);
  });
  // The guidelines beside the item: open on wide screens, closed on narrow ones, until the labeler opens or closes
  // them (kept in this browser); the raw-text switch is kept too. Run on load and on every page htmx swaps in.
  var GUIDE_KEY = "alignloop.guidelines", RAW_KEY = "alignloop.rawText";
  function recalled(k) { try { return window.localStorage.getItem(k); } catch (err) { return null; } }
  function remember(k, v) { try { window.localStorage.setItem(k, v); } catch (err) { /* storage off: not kept */ } }
  function setUp() {
    var g = document.getElementById("guidelines-panel"), raw = document.getElementById("raw-toggle");
    if (g && !g.hasAttribute("data-ready")) {
      g.setAttribute("data-ready", "1");
      var pref = recalled(GUIDE_KEY);
      g.open = pref ? pref === "open" : window.matchMedia("(min-width: 1000px)").matches;
      // click (mouse, Enter, Space) comes before the toggle: only the labeler's own choice is kept
      g.querySelector("summary").addEventListener("click", function () { remember(GUIDE_KEY, g.open ? "closed" : "open"); });
    }
    var w = writing();
    if (w && !w.hasAttribute("data-ready")) {
      w.setAttribute("data-ready", "1");
      ["demo-clear", "demo-restore"].forEach(function (id) { var b = document.getElementById(id); if (b) b.hidden = false; });
      countChars();
      focusWriting();
    }
    if (raw && !raw.hasAttribute("data-ready")) {
      raw.setAttribute("data-ready", "1");
      raw.checked = recalled(RAW_KEY) === "1";
    }
  }
  document.addEventListener("DOMContentLoaded", setUp);
  document.addEventListener("htmx:load", setUp);
})();
