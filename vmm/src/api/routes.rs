//! From a request to a [`VmControl`] call and back to a response: the
//! route table, body decoding and error mapping. Pure: no I/O.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Request, Response};
use super::{ApiError, MigrateRequest, VmControl};

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        // A VmControl may hand back anything; only 4xx and 5xx are errors.
        let status = if (400..600).contains(&e.status) {
            e.status
        } else {
            500
        };
        Response::error(status, &e.message)
    }
}

/// The body of a bodiless `PUT`: nothing, or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Decodes a JSON body; the error names the offending field.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("this request needs a JSON body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(e.inner().to_string())
        } else {
            ApiError::bad_request(format!("{path}: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("trailing characters after the JSON: {e}")))?;
    Ok(value)
}

fn no_body(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(())
    } else {
        decode::<Empty>(body).map(drop)
    }
}

fn done(result: Result<(), ApiError>) -> Response {
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => e.into(),
    }
}

fn report<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(r) => Response::json(&r),
        Err(e) => e.into(),
    }
}

/// The API's paths.
#[derive(Clone, Copy)]
enum Route {
    Info,
    Pause,
    Resume,
    Shutdown,
    Snapshot,
    Migrate,
    CancelMigration,
}

impl Route {
    fn find(path: &str) -> Option<Route> {
        Some(match path {
            "/vm" => Route::Info,
            "/vm/pause" => Route::Pause,
            "/vm/resume" => Route::Resume,
            "/vm/shutdown" => Route::Shutdown,
            "/vm/snapshot" => Route::Snapshot,
            "/vm/migrate" => Route::Migrate,
            "/vm/migrate/cancel" => Route::CancelMigration,
            _ => return None,
        })
    }

    fn method(self) -> &'static str {
        match self {
            Route::Info => "GET",
            _ => "PUT",
        }
    }
}

/// Answers one request.
pub fn handle(req: &Request, vm: &dyn VmControl) -> Response {
    let Some(route) = Route::find(&req.path) else {
        return Response::error(404, &format!("no such path: {}", req.path));
    };
    let allow = route.method();
    if req.method != allow {
        let mut r = Response::error(
            405,
            &format!("{} {} is not allowed; use {allow}", req.method, req.path),
        );
        r.allow = Some(allow);
        return r;
    }
    let body = &req.body[..];
    match route {
        Route::Info => Response::json(&vm.info()),
        Route::Pause => done(no_body(body).and_then(|()| vm.pause())),
        Route::Resume => done(no_body(body).and_then(|()| vm.resume())),
        Route::Shutdown => done(no_body(body).and_then(|()| vm.shutdown())),
        Route::CancelMigration => done(no_body(body).and_then(|()| vm.cancel_migration())),
        Route::Snapshot => report(decode(body).and_then(|r| vm.snapshot(r))),
        Route::Migrate => report(decode(body).and_then(|r: MigrateRequest| {
            r.validate()?;
            vm.migrate(r)
        })),
    }
}
