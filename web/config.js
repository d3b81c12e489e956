// Where the page finds the API and the sign-in. `make run` serves its own
// copy of this file; a deployment writes one beside index.html (README,
// "The web page").
window.CHAT_CONFIG = {
  api: "http://127.0.0.1:3000",
  // "jwt": sign in through the issuer (authorization code + PKCE);
  // "dev": local only, the page names its user (x-dev-user).
  auth: "dev",
  issuer: "http://127.0.0.1:4400",
  clientId: "chat-web",
};
