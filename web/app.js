// Gatehouse demo front end. Plain JavaScript, no build step, no inline script (CSP-friendly).
//
// The browser never sees a token: it holds only the HttpOnly session cookie (which this script
// cannot and does not read). Its main screen is one composed view, GET /api/views/home: who the
// user is (from the session) and their newest notes (from PocketBase). "My notes" then talks to
// PocketBase through Gatehouse's proxy (/api/pb/...): the cookie goes along (same origin),
// Gatehouse turns it into the user, and PocketBase's rules show each user only their own notes.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const views = ['loading', 'signed-out', 'signed-in', 'error'];
  let me = null;
  let ticker = null;

  function show(view) {
    for (const v of views) $(v).hidden = v !== view;
    $('notes').hidden = view !== 'signed-in';
    $('signin').hidden = view !== 'signed-out';
    $('signout').hidden = view !== 'signed-in';
    if (view !== 'signed-in') notes.stop();
  }

  function signedOut() {
    me = null;
    show('signed-out');
    offerPasswordForm();
  }

  // Password login (the form posts to Gatehouse, which checks the credentials with Keycloak). The
  // form is offered only when Gatehouse has password login on: POST /auth/login with an empty
  // body answers 400 (invalid request) when it is on and 404 when it is off, without a call to
  // Keycloak and without counting against the login rate limits.
  let passwordLogin = null; // unknown until asked once
  async function offerPasswordForm() {
    if (passwordLogin === null) {
      try {
        const resp = await fetch('/auth/login', {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'X-CSRF': '1', 'Content-Type': 'application/json', Accept: 'application/json' },
          body: '{}',
        });
        passwordLogin = resp.status === 400;
      } catch (_) {
        return;
      }
    }
    $('password-form').hidden = !passwordLogin;
  }

  async function passwordSignIn(event) {
    event.preventDefault();
    const error = $('pw-error');
    error.hidden = true;
    const button = $('pw-submit');
    button.disabled = true;
    try {
      const resp = await fetch('/auth/login', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'X-CSRF': '1', 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ username: $('pw-username').value, password: $('pw-password').value }),
      });
      if (!resp.ok) {
        error.textContent =
          resp.status === 401 ? 'Wrong username or password.' : await errorMessage(resp);
        error.hidden = false;
        return;
      }
      $('pw-password').value = '';
      show('loading');
      load();
    } catch (_) {
      error.textContent = 'Gatehouse cannot be reached.';
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  }

  function text(id, value, fallback) {
    const el = $(id);
    el.textContent = value || fallback || '\u2014';
    el.classList.toggle('muted', !value);
  }

  function chips(list, items) {
    list.replaceChildren();
    if (!items || items.length === 0) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = 'none';
      list.append(li);
      return;
    }
    for (const item of [...items].sort()) {
      const li = document.createElement('li');
      li.textContent = item;
      list.append(li);
    }
  }

  function clientRoles(container, roles) {
    container.replaceChildren();
    const clients = Object.keys(roles || {}).sort();
    if (clients.length === 0) {
      const ul = document.createElement('ul');
      ul.className = 'chips';
      chips(ul, []);
      container.append(ul);
      return;
    }
    for (const client of clients) {
      const row = document.createElement('div');
      row.className = 'client';
      const label = document.createElement('code');
      label.textContent = client;
      const ul = document.createElement('ul');
      ul.className = 'chips';
      chips(ul, roles[client]);
      row.append(label, ul);
      container.append(row);
    }
  }

  function initials(name) {
    const parts = String(name || '?').trim().split(/\s+/).filter(Boolean);
    const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] || '?').slice(0, 2);
    return letters.toUpperCase();
  }

  function setTime(id, unixSeconds) {
    const el = $(id);
    if (typeof unixSeconds !== 'number') {
      el.textContent = 'unknown';
      el.removeAttribute('datetime');
      return;
    }
    const d = new Date(unixSeconds * 1000);
    el.dateTime = d.toISOString();
    el.textContent = d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
  }

  function left(unixSeconds) {
    if (typeof unixSeconds !== 'number') return '';
    let s = Math.round(unixSeconds - Date.now() / 1000);
    if (s <= 0) return '(expired)';
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (h > 0) return `(in ${h} h ${m} min)`;
    if (m > 0) return `(in ${m} min ${s} s)`;
    return `(in ${s} s)`;
  }

  function tick() {
    if (!me) return;
    const session = me.session || {};
    $('idle-left').textContent = left(session.idle_expires_at);
    $('abs-left').textContent = left(session.expires_at);
    const soonest = Math.min(session.idle_expires_at ?? Infinity, session.expires_at ?? Infinity);
    // Past expiry the server has ended the session; ask it rather than guess.
    if (soonest !== Infinity && soonest * 1000 <= Date.now()) load();
  }

  // `firstNotes`: the notes part of the view (null when PocketBase did not answer in time).
  function render(body, firstNotes) {
    me = body;
    const display = body.name || body.preferred_username || body.email || body.sub;
    text('name', display, 'Signed in');
    text('email', body.email, 'no email');
    text('username', body.preferred_username);
    text('sub', body.sub);
    $('avatar').textContent = initials(display);
    chips($('realm-roles'), body.realm_roles);
    clientRoles($('client-roles'), body.client_roles);
    chips($('groups'), body.groups);
    const session = body.session || {};
    setTime('idle-expires', session.idle_expires_at);
    setTime('expires', session.expires_at);
    show('signed-in');
    notes.start(body.sub, firstNotes);
    tick();
    if (!ticker) ticker = setInterval(tick, 1000);
  }

  function fail(message) {
    me = null;
    $('error-text').textContent = message;
    show('error');
  }

  // Gatehouse's errors are {"error","message"}; PocketBase's are {"status","message","data"},
  // where data names the fields that failed validation.
  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && (body.message || body.error)) {
        const data = body.data && typeof body.data === 'object' ? body.data : {};
        const fields = Object.entries(data)
          .filter(([, v]) => v && v.message)
          .map(([k, v]) => `${k}: ${v.message}`);
        const detail = fields.length ? ` (${fields.join('; ')})` : '';
        return `${body.message || body.error}${detail} (HTTP ${resp.status})`;
      }
    } catch (_) {
      /* not JSON */
    }
    return `Gatehouse answered HTTP ${resp.status}.`;
  }

  // The main screen is one composed view (GET /api/views/home): the user from the session and
  // their newest notes from PocketBase, in one request, with only the fields shown here.
  async function load() {
    let resp;
    try {
      resp = await fetch('/api/views/home', {
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        cache: 'no-store',
      });
    } catch (e) {
      fail('Gatehouse cannot be reached. Is it running?');
      return;
    }
    if (resp.status === 401) {
      signedOut();
      return;
    }
    if (!resp.ok) {
      fail(await errorMessage(resp));
      return;
    }
    let home;
    try {
      home = await resp.json();
      if (!home || !home.me) throw new Error('no user');
    } catch (e) {
      fail('Gatehouse sent an answer this page does not understand.');
      return;
    }
    render(home.me, home.notes);
  }

  async function signOut() {
    notes.stop();
    const button = $('signout');
    button.disabled = true;
    button.textContent = 'Signing out\u2026';
    try {
      const resp = await fetch('/auth/logout', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'X-CSRF': '1', Accept: 'application/json' },
      });
      if (!resp.ok) {
        fail(await errorMessage(resp));
        return;
      }
      let body = {};
      try {
        body = await resp.json();
      } catch (_) {
        /* no body: just go home */
      }
      // Keycloak's end-session page (RP-initiated logout) sends the browser back to `/`.
      location.href = (body && body.logout_url) || '/';
    } catch (e) {
      fail('Sign-out failed: Gatehouse cannot be reached.');
    } finally {
      button.disabled = false;
      button.textContent = 'Sign out';
    }
  }

  // ------------------------------------------------------------------ My notes (PocketBase)

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // One call to PocketBase through Gatehouse's proxy. Unsafe methods carry `X-CSRF: 1` (Gatehouse
  // refuses them without it); a 401, whoever sends it, means the session is gone.
  async function pb(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (method !== 'GET') headers['X-CSRF'] = '1';
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(`/api/pb${path}`, {
        method,
        credentials: 'same-origin',
        cache: 'no-store',
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (_) {
      throw new ApiError(0, 'Your notes cannot be reached. Is Gatehouse running?');
    }
    if (resp.status === 401) {
      signedOut();
      throw new ApiError(401, 'You are signed out.');
    }
    if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
    return resp.status === 204 ? null : resp.json();
  }

  // PocketBase writes dates as "2025-01-31 09:15:00.123Z".
  function pbDate(value) {
    const d = new Date(String(value || '').replace(' ', 'T'));
    return Number.isNaN(d.getTime()) ? null : d;
  }

  const notes = (() => {
    const RECORDS = '/api/collections/notes/records';
    const RETRY_MS = 15000;
    let sub = null; // whose notes these are (the /auth/me subject)
    let userId = null; // their PocketBase `users` record: the owner of new notes
    let items = new Map(); // note id -> record
    let loaded = false;
    let source = null; // the EventSource while live updates run
    let retry = null;
    let generation = 0; // bumped by stop(): answers that arrive later are for a view that is gone

    function start(forSub, first) {
      if (sub === forSub) return;
      stop();
      sub = forSub;
      if (first && Array.isArray(first.items)) {
        // Already in the view's answer: no second request for the list.
        items = new Map(first.items.map((r) => [r.id, r]));
        loaded = true;
        render();
      } else {
        reload();
      }
      connect();
    }

    function stop() {
      generation++;
      sub = null;
      userId = null;
      items = new Map();
      loaded = false;
      if (source) source.close();
      source = null;
      clearTimeout(retry);
      retry = null;
      setLive('offline');
      clearError();
      $('note-text').value = '';
      count();
      render();
    }

    async function owner() {
      if (!userId) {
        // The users list rule shows each user only their own record.
        const page = await pb('GET', '/api/collections/users/records?perPage=1');
        userId = page && page.items && page.items[0] && page.items[0].id;
        if (!userId) throw new ApiError(0, 'PocketBase has no user record for you.');
      }
      return userId;
    }

    async function reload() {
      const gen = generation;
      try {
        const page = await pb('GET', `${RECORDS}?sort=-created&perPage=200`);
        if (gen !== generation) return;
        items = new Map((page.items || []).map((r) => [r.id, r]));
        loaded = true;
        render();
      } catch (e) {
        if (gen === generation) showError(e, 'Cannot load your notes: ');
      }
    }

    function newestFirst(a, b) {
      const ka = `${a.created || ''} ${a.id}`;
      const kb = `${b.created || ''} ${b.id}`;
      return ka < kb ? 1 : ka > kb ? -1 : 0;
    }

    function render() {
      const sorted = [...items.values()].sort(newestFirst);
      $('notes-list').replaceChildren(...sorted.map(noteItem));
      $('notes-empty').hidden = !loaded || sorted.length > 0;
    }

    function noteItem(record) {
      const li = document.createElement('li');
      li.className = 'note';
      li.dataset.id = record.id;
      li.dataset.testid = 'note';

      const text = document.createElement('p');
      text.className = 'note-text';
      text.textContent = record.text;

      const meta = document.createElement('div');
      meta.className = 'note-meta';
      const time = document.createElement('time');
      time.className = 'note-time';
      const created = pbDate(record.created);
      if (created) {
        time.dateTime = created.toISOString();
        time.textContent = created.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
      }
      const del = document.createElement('button');
      del.type = 'button';
      del.className = 'button compact note-delete';
      del.dataset.testid = 'note-delete';
      del.textContent = 'Delete';
      del.setAttribute('aria-label', 'Delete note');
      del.addEventListener('click', () => remove(record.id, del));
      meta.append(time, del);

      li.append(text, meta);
      return li;
    }

    async function add(event) {
      event.preventDefault();
      const field = $('note-text');
      const text = field.value.trim();
      clearError();
      if (!text) {
        showError('Write something first.');
        return;
      }
      const button = $('note-add');
      button.disabled = true;
      const gen = generation;
      try {
        const record = await pb('POST', RECORDS, { owner: await owner(), text });
        if (gen !== generation) return;
        items.set(record.id, record);
        render();
        field.value = '';
        count();
        // Live updates keep the list current; without them, ask the server what it has now.
        if (!isLive()) reload();
      } catch (e) {
        if (gen === generation) showError(e, 'Cannot add the note: ');
      } finally {
        button.disabled = false;
      }
    }

    async function remove(id, button) {
      button.disabled = true;
      clearError();
      const gen = generation;
      try {
        await pb('DELETE', `${RECORDS}/${encodeURIComponent(id)}`);
      } catch (e) {
        if (gen !== generation) return;
        // 404: already gone (deleted in another tab); anything else is worth showing.
        if (e.status !== 404) {
          button.disabled = false;
          showError(e, 'Cannot delete the note: ');
          return;
        }
      }
      if (gen !== generation) return;
      items.delete(id);
      render();
      if (!isLive()) reload();
    }

    // Live updates: PocketBase's realtime SSE, through the proxy like every other call. The first
    // event names our client id, which we then subscribe to the `notes` collection; PocketBase's
    // list rule decides which changes we get (only our own).
    function connect() {
      if (typeof EventSource !== 'function') return;
      const gen = generation;
      const es = new EventSource('/api/pb/api/realtime');
      source = es;
      let connectedBefore = false;
      setLive('connecting');

      es.addEventListener('PB_CONNECT', async (event) => {
        let clientId = '';
        try {
          clientId = JSON.parse(event.data).clientId;
        } catch (_) {
          /* PocketBase will refuse the empty id */
        }
        try {
          await pb('POST', '/api/realtime', { clientId, subscriptions: ['notes'] });
        } catch (e) {
          if (gen === generation && e.status !== 401) goOffline(es);
          return;
        }
        if (gen !== generation || source !== es) return;
        setLive('live');
        // After a reconnect, changes made in between were never sent to us.
        if (connectedBefore) reload();
        connectedBefore = true;
      });

      es.addEventListener('notes', (event) => {
        if (gen !== generation) return;
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        const record = message && message.record;
        if (!record || !record.id) return;
        if (message.action === 'delete') items.delete(record.id);
        else items.set(record.id, record);
        loaded = true;
        render();
      });

      es.addEventListener('error', () => {
        if (gen !== generation || source !== es) return;
        // CONNECTING: the browser retries by itself. CLOSED: it gave up (e.g. a 401 or 502).
        if (es.readyState === EventSource.CLOSED) goOffline(es);
        else setLive('connecting');
      });
    }

    function goOffline(es) {
      es.close();
      if (source === es) source = null;
      setLive('offline');
      clearTimeout(retry);
      const gen = generation;
      // Try again later. The reload finds out first whether we are still signed in (401).
      retry = setTimeout(async () => {
        await reload();
        if (gen === generation && !source) connect();
      }, RETRY_MS);
    }

    function setLive(state) {
      const el = $('live');
      el.dataset.state = state;
      el.textContent = state === 'connecting' ? 'connecting\u2026' : state;
    }

    function isLive() {
      return $('live').dataset.state === 'live';
    }

    function showError(e, prefix) {
      if (e && e.status === 401) return; // the signed-out view says it all
      const el = $('notes-error');
      el.textContent = `${prefix || ''}${typeof e === 'string' ? e : e.message}`;
      el.hidden = false;
    }

    function clearError() {
      const el = $('notes-error');
      el.textContent = '';
      el.hidden = true;
    }

    function count() {
      $('note-count').textContent = `${$('note-text').value.length} / 2000`;
    }

    $('note-form').addEventListener('submit', add);
    $('note-text').addEventListener('input', count);
    $('note-text').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) $('note-form').requestSubmit();
    });

    return { start, stop };
  })();

  $('signout').addEventListener('click', signOut);
  $('password-form').addEventListener('submit', passwordSignIn);
  $('refresh').addEventListener('click', load);
  $('retry').addEventListener('click', () => {
    show('loading');
    load();
  });
  load();
})();
