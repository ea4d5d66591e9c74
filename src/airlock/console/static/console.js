// Progressive enhancement of the red-teaming session page: answers stream in as they are generated.
// Everything a model or a person wrote is inserted as text (textContent), never as HTML.
(function () {
  "use strict";

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function streamTurn(form) {
    var transcript = document.getElementById("transcript");
    var variants = (transcript.getAttribute("data-variants") || "").split(",");
    var prompt = form.querySelector("textarea[name=content]");
    var errorBox = document.getElementById("turn-error");
    var button = form.querySelector("button[type=submit]");
    var text = prompt.value;
    if (!text.trim()) return;
    errorBox.hidden = true;
    button.disabled = true;

    var article = el("article", "turn");
    article.appendChild(el("p", "prompt", "You: " + text));
    var answers = el("div", "answers");
    var boxes = {};
    variants.forEach(function (v) {
      var section = el("section", "answer");
      section.appendChild(el("h3", null, v));
      var pre = el("pre", "content", "");
      pre.setAttribute("aria-live", "polite");
      section.appendChild(pre);
      answers.appendChild(section);
      boxes[v] = pre;
    });
    article.appendChild(answers);
    transcript.appendChild(article);

    fetch(form.action, {
      method: "POST",
      headers: { "Accept": "text/event-stream", "X-CSRF-Token": form.getAttribute("data-csrf") },
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
    }).then(function (response) {
      if (!response.ok) {
        return response.json().then(function (body) { throw new Error(body.error || "the turn was refused"); });
      }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { window.location.reload(); return; }
          buffer += decoder.decode(chunk.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (event) {
            if (event.indexOf("data: ") !== 0) return;
            var data = event.slice(6);
            if (data === "[DONE]") return;
            var payload = JSON.parse(data);
            if (payload.delta !== undefined && boxes[payload.variant]) {
              boxes[payload.variant].textContent += payload.delta;
            } else if (payload.error) {
              throw new Error(payload.error.message || "the turn failed");
            }
          });
          return pump();
        });
      }
      return pump();
    }).catch(function (err) {
      article.remove();
      errorBox.textContent = err.message;
      errorBox.hidden = false;
      button.disabled = false;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("prompt-form");
    if (!form || !window.fetch || !window.TextDecoder) return;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      streamTurn(form);
    });
  });
})();
