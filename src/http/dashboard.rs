//! `GET /dashboard`: the operator page, and its assets under `/dashboard/assets/`. Everything
//! is compiled into the binary (plain HTML, CSS and JavaScript, and uPlot for the charts), so
//! the page works offline and behind any proxy, with no CDN and no build step. Loading it
//! needs no token: the page asks for the admin token and calls the admin routes with it.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{AppError, ErrorBody};
use crate::state::AppState;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_dashboard))
        .routes(routes!(get_dashboard_asset))
}

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const PAGE: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../../assets/dashboard/index.html"),
};

/// The files served under `/dashboard/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/dashboard.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        name: "uPlot-LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/vendor/uplot/LICENSE"),
    },
];

/// Strong ETags of the page and the assets, from their bytes (computed once).
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    std::iter::once(&PAGE)
        .chain(ASSETS)
        .map(|a| {
            let hash = xxhash_rust::xxh3::xxh3_64(a.body);
            HeaderValue::from_str(&format!("\"{hash:016x}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("\"-\""))
        })
        .collect()
});

/// The page may run only its own scripts and styles and talk only to this service; it may not
/// be framed (the token field must not be overlaid by another site).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn serve(index: usize, asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = ETAGS[index].clone();
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|inm| super::etag_match(inm, etag.to_str().unwrap_or_default()));
    let mut resp = if matches.is_some() {
        // As the 200 it stands for would (the compression layer adds it there).
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        r
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    // Revalidated on every load (a 304 is cheap), so an upgraded binary's page is never
    // mixed with an older cached script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The operator page: live charts and figures, hot keys, recent admin actions, and the admin
/// actions (clear, invalidate, warm, switch version). No token is needed to load it; it asks
/// for the admin token and keeps it in the tab's session storage only.
#[utoipa::path(get, path = "/dashboard", tag = "ops",
    responses(
        (status = 200, description = "The dashboard page", body = String, content_type = "text/html"),
        (status = 304, description = "Unchanged since the `ETag` sent in `If-None-Match`"),
    ))]
pub async fn get_dashboard(headers: HeaderMap) -> Response {
    serve(0, &PAGE, &headers)
}

/// A file of the dashboard (its script, its styles, uPlot and uPlot's licence).
#[utoipa::path(get, path = "/dashboard/assets/{file}", tag = "ops",
    params(("file" = String, Path, description = "`dashboard.js`, `dashboard.css`, `uPlot.iife.min.js`, `uPlot.min.css` or `uPlot-LICENSE.txt`")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"), (String = "text/css"), (String = "text/plain"))),
        (status = 304, description = "Unchanged since the `ETag` sent in `If-None-Match`"),
        (status = 404, description = "No such file", body = ErrorBody),
    ))]
pub async fn get_dashboard_asset(
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let (i, asset) = ASSETS
        .iter()
        .enumerate()
        .find(|(_, a)| a.name == file)
        .ok_or_else(|| AppError::NotFound("no such dashboard file".into()))?;
    Ok(serve(i + 1, asset, &headers))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// The vendored uPlot files are the published package's, byte for byte: their checksums
    /// are the ones `SOURCE.md` records, and SOURCE.md names the version the issue pins.
    #[test]
    fn vendored_uplot_matches_its_recorded_checksums() {
        let source = include_str!("../../assets/dashboard/vendor/uplot/SOURCE.md");
        assert!(source.contains("`uplot` 1.6.32"), "{source}");
        let files: [(&str, &[u8]); 3] = [
            ("uPlot.iife.min.js", ASSETS[2].body),
            ("uPlot.min.css", ASSETS[3].body),
            ("LICENSE", ASSETS[4].body),
        ];
        for (name, body) in files {
            let line = source
                .lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("SOURCE.md records no checksum for {name}"));
            let recorded = line.split('|').nth(2).map(str::trim).unwrap_or_default();
            let actual = format!("{:x}", Sha256::digest(body));
            assert_eq!(actual, recorded, "{name} differs from the vendored release");
        }
        assert!(String::from_utf8_lossy(ASSETS[4].body).contains("MIT License"));
    }

    #[test]
    fn the_page_loads_only_embedded_assets() {
        let page = std::str::from_utf8(PAGE.body).expect("utf-8");
        for asset in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".css"))
        {
            assert!(
                page.contains(&format!("dashboard/assets/{}", asset.name)),
                "{} is not referenced",
                asset.name
            );
        }
        // No CDN: every src and href is relative to this service.
        for attr in ["src=\"", "href=\""] {
            for part in page.split(attr).skip(1) {
                let url = part.split('"').next().unwrap_or_default();
                assert!(
                    !url.contains("//") && !url.starts_with('/'),
                    "{attr}{url} is not a relative link"
                );
            }
        }
    }
}
