// Gatehouse demo front end. Plain JavaScript, no build step, no inline script (CSP-friendly).
//
// The browser never sees a token: it holds only the HttpOnly session cookie (which this script
// cannot and does not read) and asks Gatehouse who it is via GET /auth/me.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const views = ['loading', 'signed-out', 'signed-in', 'error'];
  let me = null;
  let ticker = null;

  function show(view) {
    for (const v of views) $(v).hidden = v !== view;
    $('signin').hidden = view !== 'signed-out';
    $('signout').hidden = view !== 'signed-in';
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

  function render(body) {
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
    tick();
    if (!ticker) ticker = setInterval(tick, 1000);
  }

  function fail(message) {
    me = null;
    $('error-text').textContent = message;
    show('error');
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && (body.message || body.error)) return `${body.message || body.error} (HTTP ${resp.status})`;
    } catch (_) {
      /* not JSON */
    }
    return `Gatehouse answered HTTP ${resp.status}.`;
  }

  async function load() {
    let resp;
    try {
      resp = await fetch('/auth/me', {
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        cache: 'no-store',
      });
    } catch (e) {
      fail('Gatehouse cannot be reached. Is it running?');
      return;
    }
    if (resp.status === 401) {
      me = null;
      show('signed-out');
      return;
    }
    if (!resp.ok) {
      fail(await errorMessage(resp));
      return;
    }
    try {
      render(await resp.json());
    } catch (e) {
      fail('Gatehouse sent an answer this page does not understand.');
    }
  }

  async function signOut() {
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

  $('signout').addEventListener('click', signOut);
  $('refresh').addEventListener('click', load);
  $('retry').addEventListener('click', () => {
    show('loading');
    load();
  });
  load();
})();
