// Swagger UI over the packaged bundle (no CDN); a file, not an inline script, so the page's CSP stays strict.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
