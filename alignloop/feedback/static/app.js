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
  document.addEventListener("keydown", function (e) {
    var f = form();
    if (!f || e.altKey || e.metaKey) return;
    var t = e.target, tag = (t && t.tagName) || "";
    var typing = tag === "TEXTAREA" || (tag === "INPUT" && /^(text|password|number|search|email)$/.test(t.type));
    if (typing) {
      if (e.key === "Enter" && e.ctrlKey) { e.preventDefault(); submit(); }
      else if (e.key === "Escape") { t.blur(); }
      return;
    }
    if (e.ctrlKey) return;
    var task = f.getAttribute("data-task"), key = e.key, low = key.toLowerCase(), done = false;
    if (key === "Enter") { e.preventDefault(); submit(); return; }
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
  });
})();
