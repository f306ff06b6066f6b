// The conversation page (templates/conversation.html): talks to /api/p/<project>/conversations/<id>.
// Every model and user text is set with textContent (never as HTML). CSP: this file only, no inline code.
//
// Elements (for tests and styles):
//   #conversation          the root (data-project, data-conversation, data-csrf)
//   #transcript            the conversation so far (.conv-msg[data-role] bubbles)
//   #turn                  the current turn: #candidate-a, #candidate-b (.conv-text), the scale #scale
//   [data-choice="1".."8"] the 8-point scale (keys 1-8): 1 "A is much better" .. 8 "B is much better"
//   #status                what is happening: generating (with seconds), queued, failed (the error), ended
//   #retry                 retry a failed / interrupted turn (shown only then)
//   #message, #send        the next message (Enter sends, Shift+Enter is a new line)
//   #end                   "End conversation" (once a turn is chosen) -> #finish-form
//   [data-rating="1".."7"] the conversation's rating (keys 1-7 while #finish-form is shown), #comment, #finish
//   #ended                 shown once ended (#next starts the next conversation)
// State: the page polls GET .../<id> every ~300 ms while a turn is generating and stops otherwise; every reply
// (a 409 from a stale tab, a 503 when the model's queue is full) carries the current state, which is re-rendered.
(function () {
  "use strict";
  var root = document.getElementById("conversation");
  if (!root) return;
  var api = "/api/p/" + encodeURIComponent(root.getAttribute("data-project")) + "/conversations/" +
    root.getAttribute("data-conversation");
  var csrf = root.getAttribute("data-csrf");
  var POLL_MS = 300, SLOW_S = 5;
  var state = null, timer = null, inflight = false, note = "", ending = false, rating = null;

  function $(id) { return document.getElementById(id); }
  function show(id, on) { $(id).hidden = !on; }
  function last() { return state && state.turns.length ? state.turns[state.turns.length - 1] : null; }

  function call(method, path, body) {
    var opts = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(api + path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) { return { status: r.status, body: j }; });
    });
  }

  function apply(reply) {
    var b = reply.body || {};
    if (reply.status >= 200 && reply.status < 300) {
      state = b; note = "";
    } else {
      if (b.state) state = b.state;
      note = b.error || ("the server answered " + reply.status);
      if (reply.status === 503) note = (b.error || "the model is busy") + " (the Retry button tries again)";
    }
    render();
  }

  // resolves with the reply's status (null: not sent, or a network error)
  function post(path, body) {
    if (inflight) return Promise.resolve(null);
    inflight = true;
    return call("POST", path, body).then(function (r) { apply(r); return r.status; },
                                         function () { note = "network error: try again"; render(); return null; })
      .then(function (status) { inflight = false; return status; }, function () { inflight = false; return null; });
  }

  function bubble(role, text, extra) {
    var d = document.createElement("div");
    d.className = "conv-msg";
    d.setAttribute("data-role", role);
    var who = document.createElement("span");
    who.className = "conv-role";
    who.textContent = role === "assistant" ? "Assistant" : role === "user" ? "You" : role;
    var p = document.createElement("div");
    p.className = "conv-text";
    p.textContent = text;
    d.appendChild(who);
    if (extra) { var e = document.createElement("span"); e.className = "conv-pick"; e.textContent = extra; d.appendChild(e); }
    d.appendChild(p);
    return d;
  }

  function renderTranscript() {
    var t = $("transcript");
    while (t.firstChild) t.removeChild(t.firstChild);
    state.opening.forEach(function (m) { t.appendChild(bubble(m.role, m.content)); });
    state.turns.forEach(function (turn) {
      if (turn.idx > 0) t.appendChild(bubble("user", turn.user));
      if (turn.status === "chosen" && turn.candidates) {
        var i = turn.chosen_side === "A" ? 0 : 1;
        t.appendChild(bubble("assistant", turn.candidates[i].text, turn.chosen_side + " · " + turn.choice_label));
      }
    });
  }

  function renderTurn(turn) {
    var open = state.status === "open";
    var active = open && turn && turn.status !== "chosen";
    show("turn", !!active);
    if (!active) { show("scale", false); return; }
    var texts = turn.candidates ? [turn.candidates[0].text, turn.candidates[1].text]
      : (turn.partial || ["", ""]);
    ["candidate-a", "candidate-b"].forEach(function (id, i) {
      var box = $(id);
      box.querySelector(".conv-text").textContent = texts[i] || (turn.status === "pending" ? "…" : "");
      box.classList.toggle("pending", turn.status === "pending");
    });
    show("scale", turn.status === "ready");
  }

  function statusText(turn) {
    if (state.status === "ended") return "Conversation ended · rated " + state.rating + " of 7.";
    if (ending) return "Rate the whole conversation (keys 1–7), add a comment if you like, then Submit rating.";
    if (!turn) return "";
    if (turn.status === "pending") {
      var s = Math.round(turn.pending_s || 0);
      if (turn.job && turn.job.state === "queued" && turn.job.position > 0) {
        return "Waiting for the model: " + turn.job.position + " request(s) ahead… " + s + "s";
      }
      return (s >= SLOW_S ? "Still generating… " : "Generating… ") + s + "s";
    }
    if (turn.status === "failed" || turn.status === "interrupted") {
      return "The generation failed: " + (turn.error || "unknown error");
    }
    if (turn.status === "ready") return "Pick the better next message: keys 1–8.";
    if (!state.can_send && state.turns.length >= state.max_turns) {
      return "This conversation reached its " + state.max_turns + " turns: end it with a rating.";
    }
    return "Write your next message, or end the conversation.";
  }

  function render() {
    if (!state) return;
    var turn = last(), open = state.status === "open";
    renderTranscript();
    renderTurn(turn);
    var st = $("status");
    st.textContent = statusText(turn) + (note ? " — " + note : "");
    st.classList.toggle("error", !!note || (turn && (turn.status === "failed" || turn.status === "interrupted")));
    show("retry", open && !!turn && (turn.status === "failed" || turn.status === "interrupted"));
    show("compose", open && !ending);
    $("send").disabled = !state.can_send;
    $("message").disabled = !open;
    show("end", open && state.can_end);
    show("finish-form", open && ending);
    $("finish").disabled = rating === null;
    show("ended", !open);
    if (!open) {
      $("ended-text").textContent = "Thank you! You rated this conversation " + state.rating + " of 7." +
        (state.note ? " Note: " + state.note + "." : "");
    }
    schedule(open && turn && turn.status === "pending");
  }

  function schedule(on) {
    if (timer) { clearTimeout(timer); timer = null; }
    if (on) timer = setTimeout(refresh, POLL_MS);
  }

  function refresh() {
    timer = null;
    return call("GET", "").then(function (r) {
      if (r.status === 200) { state = r.body; render(); } else { apply(r); }
    }, function () { schedule(true); });
  }

  function choose(n) {
    var turn = last();
    if (!turn || turn.status !== "ready") return;
    post("/turns/" + turn.idx + "/choose", { choice: n, revision: state.revision }).then(function () {
      if (state && state.can_send) $("message").focus();
    });
  }

  function send() {
    var text = $("message").value;
    if (!text.trim() || !state || !state.can_send) return;
    post("/messages", { text: text, revision: state.revision }).then(function (status) {
      var turn = last();
      // sent: 201, or 503 with the message's turn made (failed: the model was busy; Retry). A refused message (409:
      // another tab sent first; 422; a network error) stays in the box
      var sent = status === 201 || (status === 503 && turn && turn.user === text.trim());
      if (sent && turn && turn.status !== "chosen") {
        $("message").value = "";
        $("message").blur();  // keys 1-8 choose once the answers are ready, not type into the box
      }
    });
  }

  function setRating(n) {
    rating = n;
    document.querySelectorAll("[data-rating]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(parseInt(b.getAttribute("data-rating"), 10) === n));
    });
    $("finish").disabled = false;
  }

  document.querySelectorAll("[data-choice]").forEach(function (b) {
    b.addEventListener("click", function () { choose(parseInt(b.getAttribute("data-choice"), 10)); });
  });
  document.querySelectorAll("[data-rating]").forEach(function (b) {
    b.addEventListener("click", function () { setRating(parseInt(b.getAttribute("data-rating"), 10)); });
  });
  $("compose").addEventListener("submit", function (e) { e.preventDefault(); send(); });
  $("message").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("retry").addEventListener("click", function () {
    var turn = last();
    if (turn) post("/turns/" + turn.idx + "/retry", {});
  });
  $("end").addEventListener("click", function () { ending = true; note = ""; render(); });
  $("cancel-end").addEventListener("click", function () { ending = false; render(); });
  $("finish-form").addEventListener("submit", function (e) {
    e.preventDefault();
    if (rating === null) return;
    post("/end", { rating: rating, comment: $("comment").value, revision: state.revision }).then(function () {
      if (state && state.status === "ended") ending = false;
      render();
    });
  });
  document.addEventListener("keydown", function (e) {
    var tag = (e.target && e.target.tagName) || "";
    if (tag === "TEXTAREA" || tag === "INPUT" || e.ctrlKey || e.metaKey || e.altKey || !state) return;
    var n = parseInt(e.key, 10);
    if (isNaN(n)) return;
    if (ending && !$("finish-form").hidden && n >= 1 && n <= 7) { e.preventDefault(); setRating(n); return; }
    if (!$("scale").hidden && n >= 1 && n <= 8) { e.preventDefault(); choose(n); }
  });
  // a tab coming back to the front shows what another tab did meanwhile
  window.addEventListener("focus", function () { if (!timer && !inflight) refresh(); });
  refresh();
})();
