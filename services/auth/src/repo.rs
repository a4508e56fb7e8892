//! Queries of the auth schema. Every function takes any connection, so callers choose whether
//! it runs inside a transaction.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, ConnectionTrait, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
    sea_query::{Expr, ExprTrait as _, Func},
};

use crate::entity::{api_key, audit_event, refresh_token, user};

pub(crate) async fn user_by_id(db: &impl ConnectionTrait, id: &str) -> Result<Option<user::Model>, DbErr> {
    user::Entity::find_by_id(id.to_owned()).one(db).await
}

/// The users of these ids.
pub(crate) async fn users_by_ids(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<user::Model>, DbErr> {
    user::Entity::find().filter(user::Column::Id.is_in(ids.iter().cloned())).all(db).await
}

/// The user whose username or email has this key.
pub(crate) async fn user_by_login(
    db: &impl ConnectionTrait,
    key: &str,
) -> Result<Option<user::Model>, DbErr> {
    user::Entity::find()
        .filter(Condition::any().add(user::Column::UsernameKey.eq(key)).add(user::Column::EmailKey.eq(key)))
        .one(db)
        .await
}

pub(crate) async fn username_or_email_taken(
    db: &impl ConnectionTrait,
    username_key: &str,
    email_key: &str,
) -> Result<(bool, bool), DbErr> {
    let found = user::Entity::find()
        .filter(
            Condition::any()
                .add(user::Column::UsernameKey.eq(username_key))
                .add(user::Column::EmailKey.eq(email_key)),
        )
        .all(db)
        .await?;
    Ok((found.iter().any(|u| u.username_key == username_key), found.iter().any(|u| u.email_key == email_key)))
}

pub(crate) async fn insert_user(db: &impl ConnectionTrait, model: user::Model) -> Result<user::Model, DbErr> {
    user::ActiveModel::from(model).insert(db).await
}

pub(crate) async fn save_user(
    db: &impl ConnectionTrait,
    active: user::ActiveModel,
) -> Result<user::Model, DbErr> {
    active.update(db).await
}

/// A page of users ordered by username key, after `after` (exclusive).
pub(crate) async fn list_users(
    db: &impl ConnectionTrait,
    query: Option<&str>,
    include_disabled: bool,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<user::Model>, DbErr> {
    let mut select = user::Entity::find().order_by_asc(user::Column::UsernameKey).limit(limit);
    if let Some(after) = after {
        select = select.filter(user::Column::UsernameKey.gt(after));
    }
    if !include_disabled {
        select = select.filter(user::Column::Disabled.eq(false));
    }
    if let Some(query) = query {
        let pattern = format!("%{}%", escape_like(&query.to_lowercase()));
        select = select.filter(
            Condition::any()
                .add(Expr::col(user::Column::UsernameKey).like(pattern.clone()))
                .add(Expr::col(user::Column::EmailKey).like(pattern.clone()))
                .add(Func::lower(Expr::col(user::Column::DisplayName)).like(pattern)),
        );
    }
    select.all(db).await
}

fn escape_like(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

pub(crate) async fn refresh_token_by_hash(
    db: &impl ConnectionTrait,
    hash: &str,
) -> Result<Option<refresh_token::Model>, DbErr> {
    refresh_token::Entity::find().filter(refresh_token::Column::TokenHash.eq(hash)).one(db).await
}

pub(crate) async fn insert_refresh_token(
    db: &impl ConnectionTrait,
    model: refresh_token::Model,
) -> Result<refresh_token::Model, DbErr> {
    refresh_token::ActiveModel::from(model).insert(db).await
}

/// Marks a token used, only if nobody did first: the winner of two concurrent refreshes gets
/// `true`.
pub(crate) async fn mark_refresh_token_used(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let result = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::UsedAt, Expr::value(now))
        .filter(refresh_token::Column::Id.eq(id))
        .filter(refresh_token::Column::UsedAt.is_null())
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Revokes every live token of a family; returns how many.
pub(crate) async fn revoke_family(
    db: &impl ConnectionTrait,
    family: &str,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let result = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
        .filter(refresh_token::Column::FamilyId.eq(family))
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Revokes every live refresh token of a user; returns how many.
pub(crate) async fn revoke_user_tokens(
    db: &impl ConnectionTrait,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let result = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
        .filter(refresh_token::Column::UserId.eq(user_id))
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

pub(crate) async fn api_key_by_hash(
    db: &impl ConnectionTrait,
    hash: &str,
) -> Result<Option<api_key::Model>, DbErr> {
    api_key::Entity::find().filter(api_key::Column::KeyHash.eq(hash)).one(db).await
}

pub(crate) async fn api_key_by_id(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<api_key::Model>, DbErr> {
    api_key::Entity::find_by_id(id.to_owned()).one(db).await
}

pub(crate) async fn insert_api_key(
    db: &impl ConnectionTrait,
    model: api_key::Model,
) -> Result<api_key::Model, DbErr> {
    api_key::ActiveModel::from(model).insert(db).await
}

pub(crate) async fn touch_api_key(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    api_key::Entity::update_many()
        .col_expr(api_key::Column::LastUsedAt, Expr::value(now))
        .filter(api_key::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn revoke_api_key(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokedAt, Expr::value(now))
        .filter(api_key::Column::Id.eq(id))
        .filter(api_key::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn revoke_user_api_keys(
    db: &impl ConnectionTrait,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokedAt, Expr::value(now))
        .filter(api_key::Column::UserId.eq(user_id))
        .filter(api_key::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn insert_audit(db: &impl ConnectionTrait, model: audit_event::Model) -> Result<(), DbErr> {
    audit_event::ActiveModel {
        id: Set(model.id),
        time: Set(model.time),
        kind: Set(model.kind),
        actor_id: Set(model.actor_id),
        subject_id: Set(model.subject_id),
        client_address: Set(model.client_address),
        details: Set(model.details),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// A page of audit events, newest first, before `before` (exclusive).
pub(crate) async fn list_audit(
    db: &impl ConnectionTrait,
    user_id: Option<&str>,
    kinds: &[String],
    before: Option<&str>,
    limit: u64,
) -> Result<Vec<audit_event::Model>, DbErr> {
    let mut select = audit_event::Entity::find().order_by_desc(audit_event::Column::Id).limit(limit);
    if let Some(before) = before {
        select = select.filter(audit_event::Column::Id.lt(before));
    }
    if let Some(user_id) = user_id {
        select = select.filter(
            Condition::any()
                .add(audit_event::Column::ActorId.eq(user_id))
                .add(audit_event::Column::SubjectId.eq(user_id)),
        );
    }
    if !kinds.is_empty() {
        select = select.filter(audit_event::Column::Kind.is_in(kinds.iter().cloned()));
    }
    select.all(db).await
}
