//! GetExecution, ListExecutions and ListDeadLetters.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};

use super::{DeadLetter, Execution, Executor, ListRequest, Page, check_id};
use crate::{
    clients::{Access, Credentials},
    error::Error,
    repo,
};

/// A page size: 0 means 50; at most 500.
fn page_size(requested: i32) -> Result<u64, Error> {
    match requested {
        0 => Ok(50),
        n if n < 0 => Err(Error::field("page_size", "must not be negative")),
        n => Ok(n.min(500) as u64),
    }
}

/// A `(time, id)` cursor from a page token.
fn cursor(token: &str) -> Result<Option<(DateTime<Utc>, String)>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad_token = || Error::field("page_token", "is not a token from a previous response");
    let text =
        URL_SAFE_NO_PAD.decode(token).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(bad_token)?;
    let (micros, id) = text.split_once('|').ok_or_else(bad_token)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad_token)?;
    Ok(Some((at, id.to_owned())))
}

fn token(at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_micros()))
}

impl Executor {
    pub(crate) async fn get(&self, credentials: &Credentials, id: &str) -> Result<Execution, Error> {
        Ok(Execution::of(&self.visible(credentials, id, Access::Viewer).await?, true))
    }

    pub(crate) async fn list(
        &self,
        credentials: &Credentials,
        request: ListRequest,
    ) -> Result<Page<Execution>, Error> {
        check_id(&request.design_id, "design_id", "a design")?;
        self.designs.access(credentials, &request.design_id).await?;
        let limit = page_size(request.page_size)?;
        let after = cursor(&request.page_token)?;
        let mut rows = repo::list(&self.db, &request.design_id, request.status, after, limit + 1).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => token(last.created_at, &last.id),
            _ => String::new(),
        };
        Ok(Page { items: rows.iter().map(|r| Execution::of(r, false)).collect(), next_page_token })
    }

    /// Dead letters, newest first (the caller is an admin: checked by the adapter).
    pub(crate) async fn dead_letters(
        &self,
        page_size_: i32,
        page_token: &str,
    ) -> Result<Page<DeadLetter>, Error> {
        let limit = page_size(page_size_)?;
        let after = cursor(page_token)?;
        let mut rows = repo::dead_letters(&self.db, after, limit + 1).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => token(last.dead_at, &last.execution_id),
            _ => String::new(),
        };
        Ok(Page { items: rows.into_iter().map(DeadLetter::from).collect(), next_page_token })
    }
}
