"""The loopback dashboard: one static page, a client of the control API.

The page holds no data; it reads the API token from the URL fragment
(``http://127.0.0.1:PORT/#token=...``, printed by ``synord dashboard``: a
fragment never reaches server logs) and calls the same /v1 routes as the CLI.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synord</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.4em} table{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}
td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;font-family:monospace}
button{font-size:1em;padding:.4em 1.2em;margin-right:.5em}
#err{color:#b00}
</style></head><body>
<h1>synord <span id="peer"></span></h1>
<p id="err"></p>
<p>contributing: <b id="contrib">?</b>
<button id="pause">Pause</button><button id="resume">Resume</button></p>
<h2>Peers</h2><table id="peers"></table>
<h2>Jobs</h2><table id="jobs"></table>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get('token') || sessionStorage.getItem('synord-token');
if (token) sessionStorage.setItem('synord-token', token);
async function api(path, method='GET') {
  const r = await fetch(path, {method, headers: {'Authorization': 'Bearer ' + token}});
  if (!r.ok) throw new Error(path + ': ' + ((await r.json()).error || r.status));
  return r.json();
}
function rows(el, header, data) {
  el.replaceChildren();
  const tr = el.insertRow(); header.forEach(h => { const th = document.createElement('th'); th.textContent = h; tr.appendChild(th); });
  data.forEach(r => { const row = el.insertRow(); r.forEach(c => row.insertCell().textContent = c ?? '-'); });
}
async function refresh() {
  try {
    const st = await api('/v1/status');
    document.getElementById('peer').textContent = st.peer_id;
    document.getElementById('contrib').textContent = st.contributing ? 'yes' : 'no';
    rows(document.getElementById('peers'), ['peer', 'devices', 'last seen'],
      (await api('/v1/peers')).map(p => [p.peer_id, ((p.capabilities||{}).devices||[]).map(d=>d.kind).join(','), new Date(p.last_seen*1000).toLocaleTimeString()]));
    let jobs = []; try { jobs = await api('/v1/jobs'); } catch (e) {}
    rows(document.getElementById('jobs'), ['id', 'state', 'runtime', 'provider', 'exit'],
      jobs.map(j => [j.id, j.state, j.runtime, j.provider, j.exit_code]));
    document.getElementById('err').textContent = '';
  } catch (e) { document.getElementById('err').textContent = e.message; }
}
document.getElementById('pause').onclick = () => api('/v1/pause', 'POST').then(refresh);
document.getElementById('resume').onclick = () => api('/v1/resume', 'POST').then(refresh);
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
