// Shared pieces of the browser tests: environment, browser launch, response recording, screenshots
// and the Keycloak sign-in. Plain ES modules; Node's own test runner; playwright-core driving
// Debian's Chromium (no downloaded browser).
import fs from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

// ------------------------------------------------------------------ environment

const REQUIRED = ['GATEHOUSE_URL', 'KEYCLOAK_URL', 'CROSS_ORIGIN_PORT', 'ARTIFACTS_DIR'];

/** The names of required variables that are not set. */
export function missingEnv() {
  return REQUIRED.filter((name) => !process.env[name]);
}

function origin(name) {
  const value = process.env[name];
  try {
    return new URL(value).origin;
  } catch (_) {
    throw new Error(`${name}=${value} is not a URL; run the browser tests through scripts/e2e.sh`);
  }
}

/** Everything the tests need from the environment, checked. Call only when missingEnv() is empty. */
export function loadEnv() {
  const port = Number(process.env.CROSS_ORIGIN_PORT);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) {
    throw new Error(`CROSS_ORIGIN_PORT=${process.env.CROSS_ORIGIN_PORT} is not a port number`);
  }
  return {
    gatehouse: origin('GATEHOUSE_URL'),
    keycloak: process.env.KEYCLOAK_URL.replace(/\/+$/, ''),
    keycloakOrigin: origin('KEYCLOAK_URL'),
    attacker: `http://localhost:${port}`,
    attackerPort: port,
    artifacts: process.env.ARTIFACTS_DIR,
    // PocketBase reached directly (as an operator would), for control requests without a session.
    pocketbase: (process.env.POCKETBASE_URL || '').replace(/\/+$/, ''),
  };
}

// ------------------------------------------------------------------ constants

export const SESSION_COOKIE = '__Host-Http-gatehouse';
/** A JWT (JWS compact form; the third part may be empty for alg "none"). */
export const JWT = /eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/;
export const NOTES = '/api/pb/api/collections/notes/records';
export const USERS = '/api/pb/api/collections/users/records';

// ------------------------------------------------------------------ browser

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function launch() {
  return chromium.launch({ executablePath: '/usr/bin/chromium', args: CHROMIUM_ARGS });
}

/** Run `fn` but give up after `ms` (so a stuck browser call cannot hang the suite). */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ------------------------------------------------------------------ screenshots

let shotCount = 0;

/** Save a full-page screenshot as ARTIFACTS_DIR/NN-name.png; never fails the test itself. */
export async function screenshot(env, page, name) {
  shotCount += 1;
  const file = path.join(env.artifacts, `${String(shotCount).padStart(2, '0')}-${name}.png`);
  try {
    await fs.mkdir(env.artifacts, { recursive: true });
    await within(10_000, `screenshot ${name}`, page.screenshot({ path: file, fullPage: true }));
  } catch (e) {
    console.error(`# screenshot ${file} failed: ${e.message}`);
  }
  return file;
}

// ------------------------------------------------------------------ recording responses

/**
 * Records every response a browser context receives, from its first request on.
 *
 * - Status and all headers (Set-Cookie included) come from `context.on('response')` and
 *   `response.headersArray()`.
 * - Bodies come from the Chrome DevTools Protocol's `Fetch` domain at the response stage: each
 *   response is held, its body read, and then released to the page unchanged. Playwright's
 *   `response.body()` cannot be used for this: it asks for the body after the fact, and Chromium
 *   has already dropped it when the page navigated right after reading it (always the case for
 *   `POST /auth/logout`, whose answer the page reads and then leaves for Keycloak).
 *   Event streams (PocketBase realtime) are released without reading: their bodies never end.
 * - Which cookies Chromium attached to each request (`Network.requestWillBeSentExtraInfo`), to
 *   prove that cross-origin requests really carried the session cookie.
 *
 * Pages must be opened with `newPage()` so that their CDP session is attached before the first
 * request.
 */
export class Recorder {
  constructor(context, label) {
    this.context = context;
    this.label = label;
    this.responses = []; // { url, method, status, headers: [[lower-case name, value]] }
    this.bodies = []; // { page, url, method, resourceType, status, networkId, body, note }
    this.sentCookies = new Map(); // networkId -> [{ name, blocked: [reasons] }]
    this.pending = new Set();
    this.problems = []; // script errors and CSP violations on any page of the context
    context.on('response', (r) => this.track(this.onResponse(r)));
    context.on('weberror', (e) => this.problems.push(`uncaught error: ${e.error().message}`));
    context.on('console', (m) => {
      if (/Content Security Policy|Refused to (load|execute|apply|connect|frame)/i.test(m.text())) {
        this.problems.push(`CSP violation on ${m.page()?.url()}: ${m.text()}`);
      }
    });
  }

  track(promise) {
    const p = promise.catch((e) => console.error(`# recorder (${this.label}): ${e.message}`));
    this.pending.add(p);
    p.finally(() => this.pending.delete(p));
  }

  async onResponse(response) {
    const entry = {
      url: response.url(),
      method: response.request().method(),
      status: response.status(),
      headers: Object.entries(response.headers()),
    };
    this.responses.push(entry);
    try {
      const all = await within(10_000, 'headersArray', response.headersArray());
      entry.headers = all.map(({ name, value }) => [name.toLowerCase(), value]);
    } catch (e) {
      entry.headersNote = `raw headers unavailable (${e.message}); provisional headers recorded`;
    }
  }

  /** A new page of this context with body recording attached. */
  async newPage(label) {
    const page = await this.context.newPage();
    await this.attach(page, label);
    return page;
  }

  async attach(page, label) {
    const cdp = await this.context.newCDPSession(page);
    cdp.on('Network.requestWillBeSentExtraInfo', (ev) => {
      const list = (ev.associatedCookies || []).map((c) => ({ name: c.cookie.name, blocked: c.blockedReasons || [] }));
      this.sentCookies.set(ev.requestId, list);
    });
    cdp.on('Fetch.requestPaused', (ev) => this.track(this.onPaused(cdp, label, ev)));
    await cdp.send('Network.enable');
    await cdp.send('Fetch.enable', { patterns: [{ urlPattern: '*', requestStage: 'Response' }] });
  }

  async onPaused(cdp, label, ev) {
    const headers = (ev.responseHeaders || []).map((h) => [h.name.toLowerCase(), h.value]);
    const contentType = (headers.find(([n]) => n === 'content-type') || [])[1] || '';
    const status = ev.responseStatusCode || 0;
    const entry = {
      page: label,
      url: ev.request.url,
      method: ev.request.method,
      resourceType: ev.resourceType,
      status,
      networkId: ev.networkId,
      body: '',
      note: null,
    };
    this.bodies.push(entry);
    try {
      if (ev.responseErrorReason) entry.note = `network error ${ev.responseErrorReason}`;
      else if (contentType.includes('text/event-stream')) entry.note = 'event stream, not read';
      else if (status >= 300 && status < 400) entry.note = 'redirect';
      else {
        const r = await within(15_000, 'Fetch.getResponseBody', cdp.send('Fetch.getResponseBody', { requestId: ev.requestId }));
        entry.body = r.base64Encoded ? Buffer.from(r.body, 'base64').toString('latin1') : r.body;
      }
    } catch (e) {
      entry.note = `body not readable: ${e.message.split('\n')[0]}`;
    } finally {
      // Release the response to the page unchanged. Fails harmlessly if the page is gone.
      await cdp.send('Fetch.continueRequest', { requestId: ev.requestId }).catch(() => {});
    }
  }

  /** Wait until every response seen so far has been recorded. */
  async settle() {
    for (let i = 0; i < 20 && this.pending.size > 0; i++) await Promise.allSettled([...this.pending]);
  }

  /** Cookies Chromium attached to the request behind a recorded body (by its network id). */
  cookiesOf(entry) {
    return this.sentCookies.get(entry.networkId);
  }
}

/**
 * Every place in the recorded responses where a JWT or one of `secrets` ({label: value}) occurs.
 * Findings never carry the secret itself: only where it was and a short redacted sample.
 */
export function scanForSecrets(recorder, secrets) {
  const findings = [];
  const look = (where, text, extra) => {
    if (!text) return;
    const jwt = JWT.exec(text);
    if (jwt) findings.push({ kind: 'JWT', where, sample: `${jwt[0].slice(0, 10)}\u2026 (${jwt[0].length} chars)`, ...extra });
    for (const [name, value] of Object.entries(secrets)) {
      if (value && text.includes(value)) findings.push({ kind: name, where, ...extra });
    }
  };
  for (const r of recorder.responses) {
    const base = { url: r.url, status: r.status };
    look(`${r.method} ${r.url} (URL)`, r.url, { ...base, part: 'url' });
    for (const [name, value] of r.headers) {
      look(`${r.method} ${r.url} -> ${r.status}, header ${name}`, `${name}: ${value}`, { ...base, part: 'header', header: name, value });
    }
  }
  for (const b of recorder.bodies) {
    look(`${b.method} ${b.url} -> ${b.status}, body`, b.body, { url: b.url, status: b.status, part: 'body' });
  }
  return findings;
}

/** `where` of findings for a failure message (values redacted). */
export function describeFindings(findings) {
  return findings.map((f) => `  - ${f.kind} in ${f.where}${f.sample ? ` [${f.sample}]` : ''}`).join('\n');
}

// ------------------------------------------------------------------ the app and Keycloak

/**
 * From the app's signed-out view: click "Sign in", assert Keycloak's real login page, fill it and
 * come back signed in. Screenshots: <who>-keycloak-login and <who>-signed-in.
 */
export async function signIn(env, page, { username, password, who }) {
  const signin = page.locator('#signin');
  await signin.waitFor({ state: 'visible' });
  try {
    await Promise.all([page.waitForURL((u) => u.href.startsWith(`${env.keycloak}/`), { timeout: 20_000 }), signin.click()]);
  } catch (e) {
    throw new Error(`${who}: "Sign in" should lead to Keycloak's login page (${env.keycloak}/...), but the page is at ${page.url()} (${e.message.split('\n')[0]})`);
  }
  await page.locator('#username').waitFor({ state: 'visible' });
  await page.locator('#password').waitFor({ state: 'visible' });
  await screenshot(env, page, `${who}-keycloak-login`);
  await page.fill('#username', username);
  await page.fill('#password', password);
  try {
    await Promise.all([
      page.waitForURL((u) => u.origin === env.gatehouse && u.pathname === '/', { timeout: 20_000 }),
      page.click('#kc-login'),
    ]);
  } catch (e) {
    throw new Error(`${who}: after submitting Keycloak's form the browser should be back on ${env.gatehouse}/, but it is at ${page.url()} (${e.message.split('\n')[0]})`);
  }
  await page.locator('#signed-in').waitFor({ state: 'visible', timeout: 15_000 });
}

/**
 * One call from inside `page` (so with the page's origin, cookies and fetch metadata). Returns
 * { status, type, text, json } or { error } if fetch itself rejected.
 */
export function pageFetch(page, url, { method = 'GET', body, csrf = true, contentType = 'application/json' } = {}) {
  return page.evaluate(
    async ({ url, method, body, csrf, contentType }) => {
      const headers = { Accept: 'application/json' };
      if (csrf) headers['X-CSRF'] = '1';
      if (body !== undefined) headers['Content-Type'] = contentType;
      try {
        const resp = await fetch(url, {
          method,
          credentials: 'same-origin',
          cache: 'no-store',
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
        const text = await resp.text();
        let json = null;
        try {
          json = JSON.parse(text);
        } catch (_) {
          /* not JSON */
        }
        return { status: resp.status, type: resp.type, text, json };
      } catch (e) {
        return { error: `${e.name}: ${e.message}` };
      }
    },
    { url, method, body, csrf, contentType },
  );
}

/** All notes the signed-in user of `page` can list, through the proxy. */
export async function listNotes(page) {
  const r = await pageFetch(page, `${NOTES}?sort=-created&perPage=200`, { csrf: false });
  if (r.status !== 200 || !r.json || !Array.isArray(r.json.items)) {
    throw new Error(`listing notes from ${page.url()} should answer 200 with items, got ${r.status ?? r.error}: ${(r.text || '').slice(0, 300)}`);
  }
  return r.json.items;
}

/** The texts of the notes the app currently shows. */
export function shownNotes(page) {
  return page.locator('#notes-list .note .note-text').allTextContents();
}

/** Wait until the app has loaded the notes list (some notes, or the empty state). */
export function notesLoaded(page) {
  return page.waitForFunction(
    () => !document.getElementById('notes-empty').hidden || document.querySelectorAll('#notes-list .note').length > 0,
    null,
    { timeout: 15_000 },
  );
}

/** Add a note through the UI and wait until it is listed. */
export async function addNote(page, text) {
  await page.fill('#note-text', text);
  await page.click('#note-add');
  await page.locator('#notes-list .note', { hasText: text }).waitFor({ state: 'visible', timeout: 10_000 });
  // The realtime event can show the note before the POST's own answer arrives, and only that
  // answer clears the field: wait for it (the caller asserts the field is empty).
  await page
    .waitForFunction(() => document.getElementById('note-text').value === '' && !document.getElementById('note-add').disabled, null, {
      timeout: 10_000,
    })
    .catch(() => {});
}
