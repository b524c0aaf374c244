// End-to-end browser tests of the Gatehouse demo: Keycloak login, the HttpOnly session cookie,
// the main screen from one composed view (/api/views/home), "My notes" through the /api/pb/ proxy to PocketBase (with live updates), isolation between
// users, CSRF and cross-origin defences, and sign-out.
//
// Run through scripts/e2e.sh, which starts Keycloak, Gatehouse and PocketBase and sets
// GATEHOUSE_URL, KEYCLOAK_URL, CROSS_ORIGIN_PORT and ARTIFACTS_DIR:
//
//   node --test --test-concurrency=1 web/tests/
//
// The steps run in order and share state (alice's page, her notes, her PocketBase user id). A
// step whose prerequisite failed is skipped and names what it missed. Screenshots of every step
// go to ARTIFACTS_DIR (NN-<who>-<step>.png; NN-FAILED-<page>.png when a step fails).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { randomBytes } from 'node:crypto';

import * as h from './lib/harness.js';

const missing = h.missingEnv();
if (missing.length > 0) {
  test('environment for the browser tests', () => {
    assert.fail(
      `${missing.join(', ')} not set: run the browser tests through scripts/e2e.sh (it starts Keycloak, ` +
        'Gatehouse and PocketBase and sets GATEHOUSE_URL, KEYCLOAK_URL, CROSS_ORIGIN_PORT and ARTIFACTS_DIR)',
    );
  });
} else {
  describe('Gatehouse demo in headless Chromium', suite);
}

function suite() {
  const env = h.loadEnv();
  const RUN = randomBytes(4).toString('hex'); // marks this run's notes: the database may outlive a run
  const VIEWPORT = { width: 1100, height: 900 };
  const s = {}; // state the steps hand on, in order
  let browser;
  let attacker;

  before(async () => {
    attacker = await startAttackerSite(env.attackerPort);
    browser = await h.launch();
  });

  after(async () => {
    await browser?.close().catch((e) => console.error(`# closing the browser: ${e.message}`));
    if (attacker) {
      attacker.closeAllConnections();
      await new Promise((resolve) => attacker.close(resolve));
    }
  });

  async function newContext(label) {
    const context = await browser.newContext({ viewport: VIEWPORT, locale: 'en-US', colorScheme: 'light' });
    context.setDefaultTimeout(15_000);
    context.setDefaultNavigationTimeout(20_000);
    return { context, recorder: new h.Recorder(context, label) };
  }

  /** A step: screenshots of every open page if it fails. */
  function step(name, fn) {
    test(name, { timeout: 60_000 }, async (t) => {
      try {
        await fn(t);
      } catch (e) {
        for (const [label, page] of Object.entries({ alice: s.alicePage, 'alice-2': s.alicePage2, bob: s.bobPage, attacker: s.evilPage })) {
          if (page && !page.isClosed()) await h.screenshot(env, page, `FAILED-${label}`);
        }
        throw e;
      }
    });
  }

  /** Skip (naming the cause) when an earlier step did not produce what this one needs. */
  function needs(t, ...keys) {
    const absent = keys.filter((k) => s[k] === undefined);
    if (absent.length === 0) return true;
    t.skip(`needs ${absent.join(', ')} from an earlier step that failed`);
    return false;
  }

  /**
   * Assert that no recorded response carries a JWT or one of `secrets`, with two exceptions that
   * the page can never read: the Set-Cookie of /auth/callback that creates the session cookie
   * (HttpOnly; it must contain the session id, and seeing it is the recorder's positive control),
   * and Keycloak's own HttpOnly cookies on Keycloak's origin (KC_RESTART and KEYCLOAK_IDENTITY are
   * JWTs signed by Keycloak for itself; they are not tokens of the application).
   */
  function assertNoSecrets(t, recorder, secrets) {
    const findings = h.scanForSecrets(recorder, secrets);
    const sessionCookieSet = (f) =>
      f.kind !== 'JWT' &&
      f.part === 'header' &&
      f.header === 'set-cookie' &&
      f.url.startsWith(`${env.gatehouse}/auth/callback`) &&
      f.value.startsWith(`${h.SESSION_COOKIE}=${secrets[f.kind]};`) &&
      /;\s*HttpOnly/i.test(f.value);
    const keycloakCookie = (f) =>
      f.kind === 'JWT' &&
      f.part === 'header' &&
      f.header === 'set-cookie' &&
      new URL(f.url).origin === env.keycloakOrigin &&
      /;\s*HttpOnly/i.test(f.value);
    const leaks = findings.filter((f) => !sessionCookieSet(f) && !keycloakCookie(f));
    assert.equal(
      leaks.length,
      0,
      `${recorder.label}: a JWT or a session id reached the browser outside an HttpOnly Set-Cookie:\n${h.describeFindings(leaks)}`,
    );
    const kcCookies = [...new Set(findings.filter(keycloakCookie).map((f) => f.value.split('=')[0]))];
    if (kcCookies.length > 0) {
      t.diagnostic(`${recorder.label}: Keycloak set JWT-valued HttpOnly cookies on its own origin (allowed): ${kcCookies.join(', ')}`);
    }
    const unread = recorder.bodies.filter((b) => b.note && b.note.startsWith('body not readable'));
    if (unread.length > 0) {
      t.diagnostic(`${recorder.label}: ${unread.length} bodies could not be read: ${unread.map((b) => `${b.method} ${b.url} (${b.note})`).join('; ')}`);
    }
    return findings.filter(sessionCookieSet);
  }

  // ---------------------------------------------------------------- 1

  step("1. alice signs in on Keycloak's real login page and the app shows her name and roles", async () => {
    const { context, recorder } = await newContext('alice');
    s.aliceContext = context;
    s.aliceRec = recorder;
    const page = await recorder.newPage('alice');
    await page.goto(`${env.gatehouse}/`);
    await page.locator('#signed-out').waitFor({ state: 'visible' });
    assert.ok(await page.locator('#signin').isVisible(), 'the signed-out view should offer "Sign in"');
    await h.screenshot(env, page, 'alice-signed-out');

    await h.signIn(env, page, { username: 'alice', password: 'alice-password', who: 'alice' });

    assert.equal(new URL(page.url()).origin, env.gatehouse, `after login the browser should be back on ${env.gatehouse}, not ${page.url()}`);
    assert.equal((await page.textContent('#username')).trim(), 'alice', 'the app should show the username alice');
    assert.match(await page.textContent('#name'), /alice/i, "the app should show alice's name");
    const roles = await page.locator('#realm-roles li').allTextContents();
    for (const role of ['admin', 'user']) {
      assert.ok(roles.includes(role), `the realm roles shown should include "${role}"; shown: ${JSON.stringify(roles)}`);
    }
    assert.ok(await page.locator('#signout').isVisible(), 'a signed-in user should see "Sign out"');
    await h.screenshot(env, page, 'alice-signed-in');
    s.alicePage = page;
  });

  // ---------------------------------------------------------------- 1b

  step('1b. the main screen comes from one composed view: the user and her notes in one request, allow-listed fields only', async (t) => {
    if (!needs(t, 'alicePage')) return;
    const page = s.alicePage;
    await page.locator('#notes').waitFor({ state: 'visible' });
    await h.notesLoaded(page);
    await s.aliceRec.settle();
    const home = s.aliceRec.bodies.filter((b) => b.url === `${env.gatehouse}/api/views/home` && b.status === 200);
    assert.ok(home.length >= 1, `the main screen should have been loaded from GET /api/views/home; responses: ${s.aliceRec.responses.map((r) => `${r.method} ${r.url} ${r.status}`).join(', ')}`);
    const body = JSON.parse(home[home.length - 1].body);
    assert.deepEqual(Object.keys(body).sort(), ['me', 'notes', 'partial'], `the view answers exactly its parts: ${home[home.length - 1].body}`);
    assert.deepEqual(body.partial, [], 'both parts arrived');
    assert.equal(body.me.preferred_username, 'alice');
    assert.ok(body.me.client_roles && typeof body.me.client_roles === 'object', 'client roles pass through the * step');
    assert.ok(Array.isArray(body.notes.items) && typeof body.notes.totalItems === 'number', `notes summary from PocketBase: ${JSON.stringify(body.notes)}`);
    for (const n of body.notes.items) {
      assert.deepEqual(Object.keys(n).sort().filter((k) => !['created', 'id', 'text'].includes(k)), [], `only id, text and created of a note reach the page: ${JSON.stringify(n)}`);
    }
    const separate = s.aliceRec.responses.filter((r) => r.url.startsWith(`${env.gatehouse}/auth/me`) || r.url.startsWith(`${env.gatehouse}${h.NOTES}`));
    assert.deepEqual(separate.map((r) => r.url), [], 'the main screen needs neither /auth/me nor a separate notes request');
    await h.screenshot(env, page, 'alice-home-view');
  });

  // ---------------------------------------------------------------- 2

  step('2. document.cookie shows no session cookie, while the HttpOnly cookie does authenticate', async (t) => {
    if (!needs(t, 'alicePage')) return;
    const page = s.alicePage;
    const visible = await page.evaluate(() => document.cookie);
    assert.ok(!/gatehouse/i.test(visible), `document.cookie must not expose the session cookie, but it is ${JSON.stringify(visible)}`);
    // The cookie is there all the same: the page's own request is authenticated with it.
    const me = await h.pageFetch(page, '/auth/me', { csrf: false });
    assert.equal(me.status, 200, `GET /auth/me from the page should be 200 (the cookie goes along), got ${me.status ?? me.error}`);
    assert.equal(me.json?.preferred_username, 'alice', '/auth/me should answer for alice');
    await h.screenshot(env, page, 'alice-no-readable-cookie');
  });

  // ---------------------------------------------------------------- 3

  step('3. the session cookie is HttpOnly, Secure and SameSite=Lax; no response holds a JWT or the session id', async (t) => {
    if (!needs(t, 'alicePage')) return;
    const cookies = await s.aliceContext.cookies(env.gatehouse);
    const cookie = cookies.find((c) => c.name === h.SESSION_COOKIE);
    assert.ok(cookie, `the browser should hold ${h.SESSION_COOKIE} for ${env.gatehouse}; it holds ${JSON.stringify(cookies.map((c) => c.name))}`);
    assert.equal(cookie.httpOnly, true, 'the session cookie must be HttpOnly');
    assert.equal(cookie.secure, true, 'the session cookie must be Secure');
    assert.equal(cookie.sameSite, 'Lax', 'the session cookie must be SameSite=Lax');
    assert.equal(cookie.path, '/', 'the session cookie must have Path=/ (a __Host- cookie)');
    assert.ok(cookie.value.length >= 32, `the session id should be long and random; it has ${cookie.value.length} characters`);
    assert.ok(!h.JWT.test(cookie.value), 'the session cookie must hold an opaque id, not a JWT');
    s.aliceSessionId = cookie.value;

    await s.aliceRec.settle();
    const sets = assertNoSecrets(t, s.aliceRec, { 'session id': s.aliceSessionId });
    // Positive controls: the recorder really sees headers and bodies, so the check above can fail.
    assert.ok(sets.length >= 1, 'recorder control: the Set-Cookie of /auth/callback that created the session should have been recorded');
    const meBody = s.aliceRec.bodies.find((b) => b.url === `${env.gatehouse}/auth/me` && b.status === 200);
    assert.ok(meBody && meBody.body.includes('"preferred_username":"alice"'), 'recorder control: the body of GET /auth/me should have been recorded');
    const kcPage = s.aliceRec.bodies.find((b) => b.url.startsWith(env.keycloak) && b.body.includes('kc-login'));
    assert.ok(kcPage, "recorder control: Keycloak's login page should have been recorded");
    t.diagnostic(`alice: ${s.aliceRec.responses.length} responses and ${s.aliceRec.bodies.length} bodies checked so far`);
    await h.screenshot(env, s.alicePage, 'alice-cookie-and-responses-checked');
  });

  // ---------------------------------------------------------------- 4

  step('4. alice adds two notes through the UI; they are listed, rendered as text, and survive a reload', async (t) => {
    if (!needs(t, 'alicePage')) return;
    const page = s.alicePage;
    await page.locator('#notes').waitFor({ state: 'visible' });
    await h.notesLoaded(page);
    const before = await h.listNotes(page);

    const texts = [`Alice's first note ${RUN}`, `Alice's second note ${RUN} <img src=x onerror="window.__xss=1"> <b>not bold</b>`];
    for (const text of texts) await h.addNote(page, text);
    assert.equal(await page.inputValue('#note-text'), '', 'the text field should be cleared after adding');
    let shown = await h.shownNotes(page);
    assert.deepEqual(shown.slice(0, 2), [texts[1], texts[0]], `the list should show the new notes, newest first; shown: ${JSON.stringify(shown)}`);
    assert.equal(await page.locator('#notes-list img, #notes-list b').count(), 0, 'note text must be rendered as text, never as HTML');
    assert.equal(await page.evaluate(() => window.__xss), undefined, 'no script from a note may run');
    assert.ok(await page.locator('#notes-empty').isHidden(), 'the empty state should be hidden when there are notes');
    await h.screenshot(env, page, 'alice-two-notes-added');

    await page.reload();
    await page.locator('#signed-in').waitFor({ state: 'visible' });
    await h.notesLoaded(page);
    shown = await h.shownNotes(page);
    for (const text of texts) assert.ok(shown.includes(text), `after a reload the list should still show ${JSON.stringify(text)}; shown: ${JSON.stringify(shown)}`);
    // After the reload the list came from the composed view: the notes, with only id, text and created.
    await s.aliceRec.settle();
    const homes = s.aliceRec.bodies.filter((b) => b.url === `${env.gatehouse}/api/views/home` && b.status === 200);
    const home = JSON.parse(homes[homes.length - 1].body);
    for (const text of texts) {
      const n = home.notes.items.find((i) => i.text === text);
      assert.ok(n, `the view's notes part should hold ${JSON.stringify(text)}: ${homes[homes.length - 1].body.slice(0, 500)}`);
      assert.deepEqual(Object.keys(n).sort(), ['created', 'id', 'text'], `only the allow-listed fields of a note (no owner, updated, collectionId): ${JSON.stringify(n)}`);
    }

    const users = await h.pageFetch(page, h.USERS, { csrf: false });
    assert.equal(users.status, 200, `GET ${h.USERS} should be 200, got ${users.status ?? users.error}: ${users.text}`);
    assert.equal(users.json.items.length, 1, 'the users list should hold exactly one record: alice her own');
    s.aliceUserId = users.json.items[0].id;

    const items = await h.listNotes(page);
    assert.equal(items.length, before.length + 2, `exactly two notes should have been added (before ${before.length}, now ${items.length})`);
    const notes = texts.map((text) => items.find((i) => i.text === text));
    assert.ok(notes.every(Boolean), `PocketBase should list both notes; it lists ${JSON.stringify(items.map((i) => i.text))}`);
    for (const n of notes) {
      assert.equal(n.owner, s.aliceUserId, `note ${n.id} should be owned by alice's PocketBase user ${s.aliceUserId}`);
      assert.equal(await page.locator(`#notes-list .note[data-id="${n.id}"]`).count(), 1, `note ${n.id} should be shown once`);
    }
    s.aliceNotes = notes.map(({ id, text, updated }) => ({ id, text, updated }));
    await h.screenshot(env, page, 'alice-notes-after-reload');
  });

  // ---------------------------------------------------------------- 4b

  step("4b. PocketBase's superuser and admin surface stays closed through the proxy, whatever the spelling", async (t) => {
    if (!needs(t, 'alicePage')) return;
    const page = s.alicePage;
    // Names PocketBase resolves to its superusers collection: any case, or the fixed id.
    const spellings = ['_superusers', '_SUPERUSERS', '_SuperUsers', 'pbc_3142635823'];
    const endpoints = [
      ['POST', 'auth-with-password', { identity: 'admin@gatehouse.local', password: 'guess-guess' }],
      ['GET', 'auth-methods'],
      ['POST', 'request-password-reset', { email: 'admin@gatehouse.local' }],
      ['POST', 'request-otp', { email: 'admin@gatehouse.local' }],
      ['GET', 'records'],
    ];
    for (const name of spellings) {
      for (const [method, action, body] of endpoints) {
        const path = `/api/collections/${name}/${action}`;
        const r = await h.pageFetch(page, `/api/pb${path}`, { method, body });
        assert.equal(r.status, 404, `${method} /api/pb${path} with alice's session should be 404, got ${r.status ?? r.error}: ${(r.text || '').slice(0, 200)}`);
        assert.ok(!/token/i.test(r.text || ''), `no token in the answer to ${path}`);
      }
      // Control: PocketBase itself resolves this spelling (operators reach it directly).
      if (env.pocketbase) {
        const direct = await fetch(`${env.pocketbase}/api/collections/${name}/auth-methods`);
        assert.equal(direct.status, 200, `PocketBase reached directly should resolve ${name} (got ${direct.status}); otherwise this step proves nothing`);
      }
    }
    // An escaped spelling is not even canonical for Gatehouse's proxy.
    const escaped = await h.pageFetch(page, '/api/pb/api/collections/%5Fsuperusers/auth-with-password', { method: 'POST', body: {} });
    assert.ok([400, 404].includes(escaped.status), `the escaped spelling should be refused, got ${escaped.status}`);
    for (const [method, path] of [
      ['GET', '/_/'],
      ['GET', '/api/settings'],
      ['GET', '/api/logs'],
      ['GET', '/api/backups'],
      ['GET', '/api/collections'],
      ['GET', '/api/collections/notes'],
      ['POST', '/api/sql'],
    ]) {
      const r = await h.pageFetch(page, `/api/pb${path}`, { method, body: method === 'POST' ? {} : undefined });
      assert.equal(r.status, 404, `${method} /api/pb${path} with alice's session should be 404, got ${r.status ?? r.error}`);
    }
    // Proxied answers carry Gatehouse's own strict policy, not PocketBase's.
    const csp = await page.evaluate(async () => (await fetch('/api/pb/api/health', { cache: 'no-store' })).headers.get('content-security-policy'));
    assert.ok(csp && csp.includes("default-src 'none'") && csp.includes('sandbox'), `proxied answers should carry Gatehouse's CSP, got ${csp}`);
  });

  // ---------------------------------------------------------------- 5

  step('5. live updates: a note added on one of alice\'s pages appears on her other page without a reload', async (t) => {
    if (!needs(t, 'alicePage', 'aliceNotes')) return;
    const page = s.alicePage;
    const other = await s.aliceRec.newPage('alice-2');
    s.alicePage2 = other;
    await other.goto(`${env.gatehouse}/`);
    await other.locator('#signed-in').waitFor({ state: 'visible' });
    await h.notesLoaded(other);

    for (const [label, p] of [['first', page], ['second', other]]) {
      try {
        await p.locator('#live[data-state="live"]').waitFor({ timeout: 15_000 });
      } catch (_) {
        assert.fail(`the ${label} page's live indicator never turned "live" (it shows ${JSON.stringify(await p.textContent('#live'))}): PocketBase realtime did not work through the proxy`);
      }
    }
    await h.screenshot(env, other, 'alice-second-page-live');

    const navigations = { first: 0, second: 0 };
    page.on('framenavigated', (f) => f === page.mainFrame() && navigations.first++);
    other.on('framenavigated', (f) => f === other.mainFrame() && navigations.second++);
    for (const p of [page, other]) await p.evaluate(() => (window.__e2eNoReload = true));

    const text = `Live note ${RUN}`;
    await h.addNote(other, text);
    try {
      await page.locator('#notes-list .note', { hasText: text }).waitFor({ state: 'visible', timeout: 10_000 });
    } catch (_) {
      assert.fail('a note added on the second page did not appear on the first page within 10 s (no realtime event arrived)');
    }
    assert.equal(await page.evaluate(() => window.__e2eNoReload), true, 'the first page must have been updated in place, not reloaded');
    await h.screenshot(env, page, 'alice-live-note-arrived');

    await page.locator('#notes-list .note', { hasText: text }).locator('.note-delete').click();
    await page.locator('#notes-list .note', { hasText: text }).waitFor({ state: 'detached', timeout: 10_000 });
    try {
      await other.locator('#notes-list .note', { hasText: text }).waitFor({ state: 'detached', timeout: 10_000 });
    } catch (_) {
      assert.fail('a note deleted on the first page was still shown on the second page after 10 s (no realtime delete event)');
    }
    assert.equal(await other.evaluate(() => window.__e2eNoReload), true, 'the second page must have been updated in place, not reloaded');
    assert.deepEqual(navigations, { first: 0, second: 0 }, 'neither page may navigate while the updates arrive');
    const items = await h.listNotes(page);
    assert.ok(!items.some((i) => i.text === text), 'the live note should be deleted on the server too');
    await h.screenshot(env, other, 'alice-live-delete-arrived');

    await other.close();
    s.alicePage2 = undefined;
  });

  // ---------------------------------------------------------------- 6

  step("6. bob sees none of alice's notes and cannot read, change, delete or forge them", async (t) => {
    if (!needs(t, 'alicePage', 'aliceNotes', 'aliceUserId')) return;
    const { context, recorder } = await newContext('bob');
    s.bobContext = context;
    s.bobRec = recorder;
    const bob = await recorder.newPage('bob');
    s.bobPage = bob;
    await bob.goto(`${env.gatehouse}/`);
    await bob.locator('#signed-out').waitFor({ state: 'visible' });
    await h.signIn(env, bob, { username: 'bob', password: 'bob-password', who: 'bob' });
    assert.equal((await bob.textContent('#username')).trim(), 'bob', 'the app should show the username bob');
    const bobCookie = (await context.cookies(env.gatehouse)).find((c) => c.name === h.SESSION_COOKIE);
    assert.ok(bobCookie, 'bob should have a session cookie');
    s.bobSessionId = bobCookie.value;
    assert.notEqual(s.bobSessionId, s.aliceSessionId, 'bob and alice must have different sessions');

    await bob.locator('#notes').waitFor({ state: 'visible' });
    await h.notesLoaded(bob);
    const shown = await h.shownNotes(bob);
    for (const n of s.aliceNotes) assert.ok(!shown.includes(n.text), `bob's list must not show alice's note ${JSON.stringify(n.text)}`);
    assert.ok(!(await bob.textContent('#notes')).includes(RUN), "bob's notes card must show nothing of this run's notes");
    await h.screenshot(env, bob, 'bob-signed-in-sees-no-alice-notes');

    const users = await h.pageFetch(bob, h.USERS, { csrf: false });
    assert.equal(users.status, 200, `bob: GET ${h.USERS} should be 200, got ${users.status ?? users.error}`);
    assert.deepEqual(users.json.items.map((u) => u.id).filter((id) => id === s.aliceUserId), [], "bob must not see alice's user record");
    assert.equal(users.json.items.length, 1, 'bob should see exactly one user record, his own');

    const bobNotes = await h.listNotes(bob);
    const aliceIds = new Set(s.aliceNotes.map((n) => n.id));
    assert.deepEqual(bobNotes.filter((n) => aliceIds.has(n.id) || n.owner === s.aliceUserId), [], "bob's notes API must list none of alice's notes");
    const filtered = await h.pageFetch(bob, `${h.NOTES}?filter=${encodeURIComponent(`owner='${s.aliceUserId}'`)}`, { csrf: false });
    assert.equal(filtered.status, 200, `bob: filtering by alice's id should answer 200, got ${filtered.status}`);
    assert.equal(filtered.json.items.length, 0, "bob: filtering by alice's owner id must list nothing");

    const target = s.aliceNotes[0];
    const url = `${h.NOTES}/${target.id}`;
    const get = await h.pageFetch(bob, url);
    assert.equal(get.status, 404, `bob: GET alice's note should be 404, got ${get.status ?? get.error}: ${get.text}`);
    assert.ok(!get.text.includes(target.text), "bob: the answer must not contain alice's text");
    const patch = await h.pageFetch(bob, url, { method: 'PATCH', body: { text: `bob was here ${RUN}` } });
    assert.equal(patch.status, 404, `bob: PATCH alice's note should be 404, got ${patch.status ?? patch.error}: ${patch.text}`);
    const del = await h.pageFetch(bob, url, { method: 'DELETE' });
    assert.equal(del.status, 404, `bob: DELETE alice's note should be 404, got ${del.status ?? del.error}: ${del.text}`);
    const forged = await h.pageFetch(bob, h.NOTES, { method: 'POST', body: { owner: s.aliceUserId, text: `bob writes as alice ${RUN}` } });
    assert.ok([400, 403].includes(forged.status), `bob: creating a note owned by alice should be 400 or 403, got ${forged.status ?? forged.error}: ${forged.text}`);
    t.diagnostic(`bob: GET ${get.status}, PATCH ${patch.status}, DELETE ${del.status}, forged create ${forged.status} (${forged.json?.message})`);
    await h.screenshot(env, bob, 'bob-after-attempts');

    const page = s.alicePage;
    const now = await h.listNotes(page);
    for (const n of s.aliceNotes) {
      const current = now.find((i) => i.id === n.id);
      assert.ok(current, `alice's note ${n.id} must still exist`);
      assert.equal(current.text, n.text, `alice's note ${n.id} must be unchanged`);
      assert.equal(current.updated, n.updated, `alice's note ${n.id} must not have been updated`);
    }
    assert.deepEqual(now.filter((i) => i.text.includes('bob')), [], 'alice must not have any note written by bob');
    const view = await h.pageFetch(page, url, { csrf: false });
    assert.equal(view.status, 200, `alice: GET her own note should be 200, got ${view.status}`);
    assert.equal(view.json.text, target.text, "alice: her note's text is unchanged");
    await page.reload();
    await h.notesLoaded(page);
    const aliceShown = await h.shownNotes(page);
    for (const n of s.aliceNotes) assert.ok(aliceShown.includes(n.text), `alice should still see ${JSON.stringify(n.text)}`);
    await h.screenshot(env, page, 'alice-notes-unchanged-after-bob');
  });

  // ---------------------------------------------------------------- 7

  step("7. a POST without X-CSRF from alice's own page is refused with 403 csrf and creates nothing", async (t) => {
    if (!needs(t, 'alicePage', 'aliceUserId')) return;
    const page = s.alicePage;
    const before = await h.listNotes(page);
    const marker = `no X-CSRF ${RUN}`;
    const refused = await h.pageFetch(page, h.NOTES, { method: 'POST', csrf: false, body: { owner: s.aliceUserId, text: marker } });
    assert.equal(refused.status, 403, `a POST without X-CSRF should be 403, got ${refused.status ?? refused.error}: ${refused.text}`);
    assert.equal(refused.json?.error, 'csrf', `the refusal should be {"error":"csrf"}, got ${refused.text}`);
    const after = await h.listNotes(page);
    assert.ok(!after.some((n) => n.text === marker), 'the refused POST must not have created a note');
    assert.equal(after.length, before.length, 'the number of notes must be unchanged');

    // Control: the very same request with the header is accepted, so the header alone decided.
    const accepted = await h.pageFetch(page, h.NOTES, { method: 'POST', body: { owner: s.aliceUserId, text: `${marker} (control)` } });
    assert.equal(accepted.status, 200, `control: the same POST with X-CSRF should be 200, got ${accepted.status}: ${accepted.text}`);
    const cleanup = await h.pageFetch(page, `${h.NOTES}/${accepted.json.id}`, { method: 'DELETE' });
    assert.equal(cleanup.status, 204, `control: deleting it again should be 204, got ${cleanup.status}`);
    await page.reload();
    await h.notesLoaded(page);
    await h.screenshot(env, page, 'alice-csrf-refused-nothing-created');
  });

  // ---------------------------------------------------------------- 8

  step('8. a page on another origin of the same site cannot read or write alice\'s notes, though her cookie goes along', async (t) => {
    if (!needs(t, 'alicePage', 'aliceUserId', 'aliceNotes')) return;
    const before = await h.listNotes(s.alicePage);
    const evil = await s.aliceRec.newPage('attacker');
    s.evilPage = evil;
    await evil.goto(`${env.attacker}/`);
    assert.equal(await evil.title(), 'Totally harmless page', 'the attacker page should be served');
    await h.screenshot(env, evil, 'attacker-page');

    const markers = { preflight: `cross-origin with X-CSRF ${RUN}`, noCors: `cross-origin no-cors ${RUN}`, form: `cross-origin form ${RUN}` };
    const result = await evil.evaluate(
      async ({ gatehouse, notes, owner, markers }) => {
        const out = {};
        const attempt = async (name, fn) => {
          try {
            out[name] = await fn();
          } catch (e) {
            out[name] = { rejected: `${e.name}: ${e.message}` };
          }
        };
        const url = gatehouse + notes;
        await attempt('readNotes', async () => {
          const r = await fetch(url, { credentials: 'include' });
          return { status: r.status, text: await r.text() };
        });
        await attempt('readNotesNoCors', async () => {
          const r = await fetch(url, { credentials: 'include', mode: 'no-cors' });
          return { type: r.type, status: r.status, text: await r.text() };
        });
        await attempt('readMe', async () => {
          const r = await fetch(`${gatehouse}/auth/me`, { credentials: 'include' });
          return { status: r.status, text: await r.text() };
        });
        await attempt('postWithCsrf', async () => {
          const r = await fetch(url, {
            method: 'POST',
            credentials: 'include',
            headers: { 'X-CSRF': '1', 'Content-Type': 'application/json' },
            body: JSON.stringify({ owner, text: markers.preflight }),
          });
          return { status: r.status, text: await r.text() };
        });
        await attempt('postNoCors', async () => {
          const r = await fetch(url, {
            method: 'POST',
            mode: 'no-cors',
            credentials: 'include',
            headers: { 'Content-Type': 'text/plain' },
            body: JSON.stringify({ owner, text: markers.noCors }),
          });
          return { type: r.type, status: r.status, text: await r.text() };
        });
        return out;
      },
      { gatehouse: env.gatehouse, notes: h.NOTES, owner: s.aliceUserId, markers },
    );
    t.diagnostic(`attacker page saw: ${JSON.stringify(result)}`);
    assert.match(result.readNotes.rejected ?? '', /^TypeError/, `a credentialed cross-origin GET of the notes must fail in the page, got ${JSON.stringify(result.readNotes)}`);
    assert.deepEqual(result.readNotesNoCors, { type: 'opaque', status: 0, text: '' }, 'a no-cors GET must give the page only an opaque, empty response');
    assert.match(result.readMe.rejected ?? '', /^TypeError/, `a cross-origin GET /auth/me must fail in the page, got ${JSON.stringify(result.readMe)}`);
    assert.match(result.postWithCsrf.rejected ?? '', /^TypeError/, `a cross-origin POST with X-CSRF must be stopped (preflight refused), got ${JSON.stringify(result.postWithCsrf)}`);
    assert.equal(result.postNoCors.type, 'opaque', `a no-cors POST gives the page an opaque response, got ${JSON.stringify(result.postNoCors)}`);

    // A classic form post (text/plain body shaped like JSON), as a top-level navigation.
    const formUrl = `${env.gatehouse}${h.NOTES}`;
    await Promise.all([
      evil.waitForURL(formUrl),
      evil.evaluate(
        ({ formUrl, owner, marker }) => {
          const form = document.createElement('form');
          form.method = 'POST';
          form.action = formUrl;
          form.enctype = 'text/plain';
          const input = document.createElement('input');
          input.type = 'hidden';
          input.name = `{"owner":"${owner}","text":"${marker}","pad":"`;
          input.value = '"}';
          form.append(input);
          document.body.append(form);
          form.submit();
        },
        { formUrl, owner: s.aliceUserId, marker: markers.form },
      ),
    ]);
    await h.screenshot(env, evil, 'attacker-form-post-refused');

    // What Gatehouse answered (the harness can see it; the attacker could not). Bodies of no-cors
    // requests are empty even here: Chromium's opaque-response blocking drops opaque JSON before
    // DevTools sees it, so for those the status is the evidence.
    await s.aliceRec.settle();
    const fromEvil = s.aliceRec.bodies.filter((b) => b.page === 'attacker' && b.url.startsWith(env.gatehouse));
    const summary = (list) => list.map((b) => `${b.method} ${b.url} -> ${b.status} ${b.body.slice(0, 120)}`).join('; ');
    const apiGets = fromEvil.filter((b) => b.method === 'GET' && b.url === formUrl);
    assert.ok(apiGets.length >= 1, `the cross-origin GETs should have reached Gatehouse; recorded: ${summary(fromEvil)}`);
    assert.equal(apiGets.length, 2, `both cross-origin GETs (cors and no-cors) should have reached Gatehouse; recorded: ${summary(fromEvil)}`);
    for (const b of apiGets) {
      assert.equal(b.status, 403, `Gatehouse should refuse a cross-origin GET of the API with 403, got ${b.status}: ${b.body}`);
      assert.ok(!s.aliceNotes.some((n) => b.body.includes(n.text)), "the refusal must not contain alice's notes");
    }
    assert.ok(apiGets.some((b) => /"error":"cross_origin"/.test(b.body)), `the cors-mode GET should be refused as cross_origin; recorded: ${summary(apiGets)}`);
    const posts = fromEvil.filter((b) => b.method === 'POST' && b.url === formUrl);
    assert.equal(posts.length, 2, `only the no-cors POST and the form POST should reach Gatehouse (the one with X-CSRF must stop at its preflight); recorded: ${summary(posts)}`);
    for (const b of posts) {
      assert.equal(b.status, 403, `Gatehouse should refuse the cross-origin POST with 403, got ${b.status}: ${b.body}`);
    }
    const formPost = posts.find((b) => b.resourceType === 'Document');
    assert.ok(formPost, `the form POST (a navigation) should have been recorded; recorded: ${summary(posts)}`);
    assert.match(formPost.body, /"error":"(csrf|cross_origin)"/, `the form POST should be refused as csrf or cross_origin, got ${formPost.body}`);
    // The hardest case really happened: the same-site requests carried alice's session cookie.
    for (const b of [...apiGets, ...posts]) {
      const sent = s.aliceRec.cookiesOf(b) || [];
      assert.ok(
        sent.some((c) => c.name === h.SESSION_COOKIE && c.blocked.length === 0),
        `${b.method} ${b.url} from the attacker page should have carried ${h.SESSION_COOKIE} (same site, Lax); cookies: ${JSON.stringify(sent)}`,
      );
    }
    const corsHeaders = s.aliceRec.responses.filter(
      (r) => r.url.startsWith(env.gatehouse) && r.headers.some(([n]) => n.startsWith('access-control-allow-')),
    );
    assert.deepEqual(corsHeaders.map((r) => r.url), [], 'Gatehouse must never answer with CORS headers');

    const after = await h.listNotes(s.alicePage);
    for (const marker of Object.values(markers)) {
      assert.ok(!after.some((n) => n.text.includes(marker)), `no note may have been created by the attacker page (${marker})`);
    }
    assert.equal(after.length, before.length, "the number of alice's notes must be unchanged");
    await s.alicePage.reload();
    await h.notesLoaded(s.alicePage);
    await h.screenshot(env, s.alicePage, 'alice-notes-unchanged-after-attacker');
    await evil.close();
    s.evilPage = undefined;
  });

  // ---------------------------------------------------------------- 9

  step('9. sign-out ends the Gatehouse session and the Keycloak SSO session', async (t) => {
    if (!needs(t, 'alicePage', 'aliceSessionId')) return;
    const page = s.alicePage;
    await page.locator('#signout').waitFor({ state: 'visible' });
    const navigations = [];
    page.on('request', (r) => r.isNavigationRequest() && r.frame() === page.mainFrame() && navigations.push(r.url()));
    await page.click('#signout');

    // Back through Keycloak's end-session endpoint to the signed-out view. Keycloak asks for a
    // confirmation only if its session survived Gatehouse's revocation (docs/contracts.md).
    let confirmed = false;
    const deadline = Date.now() + 20_000;
    for (;;) {
      assert.ok(Date.now() < deadline, `after "Sign out" the app did not come back signed out; the page is at ${page.url()}, navigations: ${navigations.join(' -> ')}`);
      const here = page.url();
      if (here.startsWith(env.keycloak) && (await page.locator('#kc-logout').isVisible().catch(() => false))) {
        await h.screenshot(env, page, 'alice-keycloak-logout-confirmation');
        await page.click('#kc-logout');
        confirmed = true;
      } else if (here.startsWith(`${env.gatehouse}/`) && navigations.length > 0 && (await page.locator('#signed-out').isVisible().catch(() => false))) {
        break;
      }
      await page.waitForTimeout(200);
    }
    if (confirmed) t.diagnostic('Keycloak asked to confirm the logout: its SSO session was still alive after POST /auth/logout');
    assert.ok(navigations.some((u) => u.startsWith(`${env.keycloak}/`)), `sign-out should pass through Keycloak's end-session endpoint; navigations: ${navigations.join(' -> ')}`);
    assert.ok(await page.locator('#signed-in').isHidden(), 'the signed-in view must be gone');
    assert.ok(await page.locator('#notes').isHidden(), 'the notes card must be gone');
    assert.ok(await page.locator('#signin').isVisible(), '"Sign in" should be offered again');
    await h.screenshot(env, page, 'alice-signed-out-again');

    await s.aliceRec.settle();
    const logout = s.aliceRec.bodies.find((b) => b.method === 'POST' && b.url === `${env.gatehouse}/auth/logout`);
    assert.ok(logout, 'the answer of POST /auth/logout should have been recorded');
    assert.equal(logout.status, 200, `POST /auth/logout should be 200, got ${logout.status}`);
    const logoutUrl = JSON.parse(logout.body).logout_url;
    assert.ok(typeof logoutUrl === 'string' && logoutUrl.startsWith(env.keycloak), `logout_url should be Keycloak's end-session URL, got ${logoutUrl}`);
    assert.ok(!logoutUrl.includes('id_token_hint'), 'logout_url must not carry an id_token_hint');

    const notes = await h.pageFetch(page, h.NOTES, { csrf: false });
    assert.equal(notes.status, 401, `the notes API should answer 401 after sign-out, got ${notes.status ?? notes.error}: ${notes.text}`);
    assert.equal(notes.json?.error, 'unauthenticated', `the 401 should be {"error":"unauthenticated"}, got ${notes.text}`);
    const left = (await s.aliceContext.cookies(env.gatehouse)).filter((c) => c.name === h.SESSION_COOKIE);
    assert.deepEqual(left, [], 'the session cookie should have been cleared');
    // The session is gone on the server, not just from the browser: replay the old cookie.
    for (const path of ['/auth/me', h.NOTES]) {
      const status = await replayCookie(`${env.gatehouse}${path}`, `${h.SESSION_COOKIE}=${s.aliceSessionId}`);
      assert.equal(status, 401, `replaying the old session cookie at ${path} should give 401, got ${status}`);
    }

    // Keycloak's SSO session is gone too: "Sign in" shows the password form, no silent login.
    try {
      await Promise.all([page.waitForURL((u) => u.href.startsWith(`${env.keycloak}/`), { timeout: 15_000 }), page.click('#signin')]);
      await page.locator('#password').waitFor({ state: 'visible' });
    } catch (e) {
      assert.fail(
        `"Sign in" after sign-out should stop at Keycloak's password form, but the page is at ${page.url()} ` +
          `(signed in again without a password? the Keycloak SSO session survived): ${e.message.split('\n')[0]}`,
      );
    }
    await page.waitForTimeout(1000);
    assert.ok(page.url().startsWith(env.keycloak), `"Sign in" should stay on Keycloak's login form, but went on to ${page.url()}`);
    assert.ok(await page.locator('#password').isVisible(), "Keycloak should ask for alice's password again");
    await h.screenshot(env, page, 'alice-keycloak-asks-password-again');
  });

  // ---------------------------------------------------------------- 9b

  step('9b. the username/password form beside "Sign in with Keycloak" signs bob in through Gatehouse; it never posts to Keycloak', async (t) => {
    const { context, recorder } = await newContext('bob-password');
    try {
      const page = await recorder.newPage('bob-password');
      await page.goto(`${env.gatehouse}/`);
      await page.locator('#signed-out').waitFor({ state: 'visible' });
      await page.locator('#password-form').waitFor({ state: 'visible' });
      await page.fill('#pw-username', 'bob');
      await page.fill('#pw-password', 'not-bobs-password');
      await page.click('#pw-submit');
      await page.locator('#pw-error').waitFor({ state: 'visible' });
      assert.match(await page.textContent('#pw-error'), /wrong username or password/i, 'a wrong password is refused');
      assert.ok(await page.locator('#signed-out').isVisible(), 'still signed out after a wrong password');
      await page.fill('#pw-password', 'bob-password');
      await page.click('#pw-submit');
      await page.locator('#signed-in').waitFor({ state: 'visible' });
      assert.equal((await page.textContent('#username')).trim(), 'bob', 'the app shows bob after the password login');
      await h.notesLoaded(page);
      await recorder.settle();
      const kc = recorder.responses.filter((r) => new URL(r.url).origin === env.keycloakOrigin);
      assert.deepEqual(kc.map((r) => `${r.method} ${r.url}`), [], 'the browser never talks to Keycloak for a password login');
      const logins = recorder.responses.filter((r) => r.method === 'POST' && r.url === `${env.gatehouse}/auth/login`);
      assert.deepEqual(logins.map((r) => r.status).filter((st) => st !== 400), [401, 200], 'the form posted to Gatehouse: refused, then accepted');
      assertNoSecrets(t, recorder, {});
      await h.screenshot(env, page, 'bob-password-signed-in');
    } finally {
      await context.close();
    }
  });

  // ---------------------------------------------------------------- 10

  step('10. over the whole run: no JWT or session id in any response, no CSP violation, no script error', async (t) => {
    if (!needs(t, 'aliceRec', 'aliceSessionId')) return;
    const secrets = { 'alice session id': s.aliceSessionId };
    if (s.bobSessionId) secrets['bob session id'] = s.bobSessionId;
    for (const recorder of [s.aliceRec, s.bobRec].filter(Boolean)) {
      await recorder.settle();
      assertNoSecrets(t, recorder, secrets);
      assert.deepEqual(recorder.problems, [], `${recorder.label}: pages reported script errors or CSP violations`);
      t.diagnostic(`${recorder.label}: ${recorder.responses.length} responses and ${recorder.bodies.length} bodies checked`);
    }
  });
}

// ------------------------------------------------------------------ helpers

/** The attacker: a page on http://localhost:PORT, same site as Gatehouse, another origin. */
function startAttackerSite(port) {
  const html =
    '<!doctype html><html><head><meta charset="utf-8"><title>Totally harmless page</title></head>' +
    '<body><h1>Nothing to see here</h1><p>This page is on another origin of the same site as Gatehouse.</p></body></html>';
  const server = http.createServer((req, res) => {
    if (req.url === '/' || req.url.startsWith('/?')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(html);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`cannot start the attacker page on port ${port}: ${e.message}`)));
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

/** Status of a GET with the given Cookie header, from Node (not the browser). */
function replayCookie(url, cookie) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: { cookie, accept: 'application/json' } }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.setTimeout(10_000, () => req.destroy(new Error(`GET ${url}: timeout`)));
    req.on('error', reject);
  });
}
