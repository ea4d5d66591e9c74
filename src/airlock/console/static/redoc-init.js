// ReDoc over the packaged standalone bundle (no CDN).
window.addEventListener("load", function () {
  var el = document.getElementById("redoc-container");
  Redoc.init(el.getAttribute("data-spec-url"), {}, el);
});
