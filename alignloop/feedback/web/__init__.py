"""The labeling web app's parts; `alignloop.feedback.app.create_app` assembles them.

    common.py     what every route uses: the app's `WebContext` (store, templates, caches), the signed-in user,
                  CSRF checks, rendering, form reading, database calls (inline or in the thread pool), HTTP errors
    auth.py       sign-in / sign-out pages and the sign-in throttle
    labeling.py   the labeling pages: projects, guidelines, label, submit, skip, history, edit
    admin.py      admin pages: projects and labelers, dashboard, export download
    api.py        the JSON API (scripts, the load test), with group commit for submit + next
"""
