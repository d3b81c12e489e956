// Sign-in with the OIDC authorization-code flow and PKCE (no client
// secret: what Cognito's hosted UI gives a single-page app). The token is
// kept in memory only, never in localStorage; only the PKCE verifier and
// state cross the redirect, in sessionStorage, and are removed on return.

const b64url = (bytes) =>
  btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

function random(n = 32) {
  return b64url(crypto.getRandomValues(new Uint8Array(n)));
}

export class SignIn {
  constructor({ issuer, clientId, redirectUri }) {
    this.issuer = issuer.replace(/\/$/, "");
    this.clientId = clientId;
    this.redirectUri = redirectUri;
    this.token = null;
    this.expiresAt = 0;
    this.user = null;
  }

  async endpoints() {
    if (!this.discovered) {
      const resp = await fetch(`${this.issuer}/.well-known/openid-configuration`);
      if (!resp.ok) throw new Error(`the issuer's discovery document answered ${resp.status}`);
      this.discovered = await resp.json();
    }
    return this.discovered;
  }

  /** Goes to the issuer's sign-in page; `keep` comes back from `complete`. */
  async begin(keep) {
    const { authorization_endpoint } = await this.endpoints();
    const verifier = random(48);
    const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
    const state = random(16);
    sessionStorage.setItem("chat.pkce", JSON.stringify({ verifier, state, keep }));
    const q = new URLSearchParams({
      response_type: "code",
      client_id: this.clientId,
      redirect_uri: this.redirectUri,
      scope: "openid",
      code_challenge: challenge,
      code_challenge_method: "S256",
      state,
    });
    location.assign(`${authorization_endpoint}?${q}`);
  }

  /** After the redirect back: trades the code for tokens. */
  async complete() {
    const url = new URL(location.href);
    const code = url.searchParams.get("code");
    if (!code) return { signedIn: false };
    const saved = JSON.parse(sessionStorage.getItem("chat.pkce") || "null");
    sessionStorage.removeItem("chat.pkce");
    history.replaceState(null, "", url.pathname);
    if (!saved || saved.state !== url.searchParams.get("state")) {
      throw new Error("the sign-in answer does not match the sign-in this page started");
    }
    const { token_endpoint } = await this.endpoints();
    const resp = await fetch(token_endpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code,
        redirect_uri: this.redirectUri,
        client_id: this.clientId,
        code_verifier: saved.verifier,
      }),
    });
    if (!resp.ok) throw new Error(`the issuer refused the sign-in (${resp.status})`);
    const t = await resp.json();
    this.token = t.access_token;
    this.expiresAt = Date.now() + (t.expires_in || 3600) * 1000;
    try {
      this.user = JSON.parse(atob(this.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub;
    } catch {
      this.user = "signed in";
    }
    return { signedIn: true, keep: saved.keep };
  }
}
