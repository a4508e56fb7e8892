//! Conversations: chats whose history is kept, and sent back (trimmed to a token budget,
//! oldest messages first, the system prompt always) on every turn.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SubsecRound as _, Utc};
use sea_orm::{
    ActiveModelTrait as _,
    ActiveValue::Set,
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, TransactionTrait as _,
    sea_query::{Expr, ExprTrait as _},
};

use crate::{
    entity::{conversation, message},
    error::Error,
    model::{Message, Role},
    tokens,
};

/// A conversation.
pub(crate) type Conversation = conversation::Model;

/// A new conversation's fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewConversation {
    pub(crate) title: String,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) system_prompt: String,
    pub(crate) token_budget: i32,
    pub(crate) design_id: String,
}

/// The conversations of the service.
pub(crate) struct Conversations {
    db: DatabaseConnection,
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no conversation `{}`", id.chars().take(64).collect::<String>()))
}

fn bad_token() -> Error {
    Error::field("page_token", "is not a token from a previous response")
}

/// History that fits `budget` tokens: the newest messages, whole, without a tool result whose
/// call was left out.
pub(crate) fn trim(history: Vec<(Message, i32)>, budget: i64) -> Vec<Message> {
    let mut kept: Vec<Message> = Vec::new();
    let mut used = 0i64;
    for (m, tokens) in history.into_iter().rev() {
        if used + i64::from(tokens) > budget {
            break;
        }
        used += i64::from(tokens);
        kept.push(m);
    }
    kept.reverse();
    while kept.first().is_some_and(|m| m.role == Role::Tool) {
        kept.remove(0);
    }
    kept
}

impl Conversations {
    pub(crate) fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    pub(crate) async fn create(&self, owner: &str, new: NewConversation) -> Result<Conversation, Error> {
        let now = now();
        let row = conversation::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            owner_id: Set(owner.to_owned()),
            title: Set(new.title),
            provider: Set(new.provider),
            model: Set(new.model),
            system_prompt: Set(new.system_prompt),
            token_budget: Set(new.token_budget),
            design_id: Set(new.design_id),
            message_count: Set(0),
            created_at: Set(now),
            updated_at: Set(now),
        };
        Ok(row.insert(&self.db).await?)
    }

    /// A conversation of `owner` (admins: anyone's); NOT_FOUND otherwise.
    pub(crate) async fn get(&self, owner: &str, admin: bool, id: &str) -> Result<Conversation, Error> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(Error::field("conversation_id", "is not a conversation id (a UUID)"));
        }
        let row = conversation::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| not_found(id))?;
        if row.owner_id != owner && !admin {
            return Err(not_found(id));
        }
        Ok(row)
    }

    /// Every message of a conversation, oldest first, with its tokens.
    pub(crate) async fn messages(&self, id: &str) -> Result<Vec<(Message, i32, DateTime<Utc>)>, Error> {
        let rows = message::Entity::find()
            .filter(message::Column::ConversationId.eq(id))
            .order_by_asc(message::Column::Seq)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((serde_json::from_str(&r.message).ok()?, r.tokens, r.created_at)))
            .collect())
    }

    /// What a turn sends before its new messages: the system prompt, then as much of the
    /// history as fits `budget` tokens beside them.
    pub(crate) async fn context(&self, c: &Conversation, new_tokens: u64) -> Result<Vec<Message>, Error> {
        let history: Vec<(Message, i32)> =
            self.messages(&c.id).await?.into_iter().map(|(m, t, _)| (m, t)).collect();
        let mut budget = i64::from(c.token_budget) - new_tokens as i64;
        let mut out = Vec::new();
        if !c.system_prompt.is_empty() {
            let system = Message::new(Role::System, c.system_prompt.clone());
            budget -= tokens::message(&system) as i64;
            out.push(system);
        }
        out.extend(trim(history, Ord::max(budget, 0)));
        Ok(out)
    }

    /// Appends a turn's messages.
    pub(crate) async fn append(&self, id: &str, messages: &[Message]) -> Result<(), Error> {
        if messages.is_empty() {
            return Ok(());
        }
        // The count moves first: that write takes the conversation's lock (on SQLite, the
        // database's) before anything is read, so concurrent turns queue instead of failing.
        let now = now();
        let txn = self.db.begin().await?;
        let updated = conversation::Entity::update_many()
            .col_expr(
                conversation::Column::MessageCount,
                Expr::col(conversation::Column::MessageCount).add(messages.len() as i32),
            )
            .col_expr(conversation::Column::UpdatedAt, Expr::value(now))
            .filter(conversation::Column::Id.eq(id))
            .exec_with_returning(&txn)
            .await?;
        let Some(row) = updated.first() else { return Err(not_found(id)) };
        let start = row.message_count - messages.len() as i32;
        let rows: Vec<message::ActiveModel> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| message::ActiveModel {
                conversation_id: Set(id.to_owned()),
                seq: Set(start + i as i32),
                message: Set(serde_json::to_string(m).unwrap_or_default()),
                tokens: Set(Ord::min(tokens::message(m), i32::MAX as u64) as i32),
                created_at: Set(now),
            })
            .collect();
        message::Entity::insert_many(rows).exec_without_returning(&txn).await?;
        txn.commit().await?;
        Ok(())
    }

    /// A page of `owner`'s conversations, most recently updated first.
    pub(crate) async fn list(
        &self,
        owner: &str,
        design_id: &str,
        page_size: u64,
        page_token: &str,
    ) -> Result<(Vec<Conversation>, String), Error> {
        let mut select = conversation::Entity::find()
            .filter(conversation::Column::OwnerId.eq(owner))
            .order_by_desc(conversation::Column::UpdatedAt)
            .order_by_desc(conversation::Column::Id)
            .limit(page_size + 1);
        if !design_id.is_empty() {
            select = select.filter(conversation::Column::DesignId.eq(design_id));
        }
        if !page_token.is_empty() {
            let text = URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_token)?;
            let (micros, id) = text.split_once('|').ok_or_else(bad_token)?;
            let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad_token())?)
                .ok_or_else(bad_token)?;
            select =
                select.filter(sea_orm::Condition::any().add(conversation::Column::UpdatedAt.lt(at)).add(
                    conversation::Column::UpdatedAt.eq(at).and(conversation::Column::Id.lt(id.to_owned())),
                ));
        }
        let mut rows = select.all(&self.db).await?;
        let more = rows.len() as u64 > page_size;
        rows.truncate(page_size as usize);
        let next = match rows.last() {
            Some(last) if more => {
                URL_SAFE_NO_PAD.encode(format!("{}|{}", last.updated_at.timestamp_micros(), last.id))
            }
            _ => String::new(),
        };
        Ok((rows, next))
    }

    pub(crate) async fn delete(&self, owner: &str, admin: bool, id: &str) -> Result<(), Error> {
        let row = self.get(owner, admin, id).await?;
        let txn = self.db.begin().await?;
        message::Entity::delete_many()
            .filter(message::Column::ConversationId.eq(row.id.clone()))
            .exec(&txn)
            .await?;
        conversation::Entity::delete_by_id(row.id).exec(&txn).await?;
        txn.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_keeps_the_newest_whole_messages() {
        let m = |role, text: &str| (Message::new(role, text), 10);
        let history =
            vec![m(Role::User, "a"), m(Role::Assistant, "b"), m(Role::Tool, "c"), m(Role::User, "d")];
        let kept: Vec<String> = trim(history.clone(), 25).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["d"], "a tool result without its call is left out");
        let kept: Vec<String> = trim(history.clone(), 30).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["b", "c", "d"]);
        assert!(trim(history, 5).is_empty());
    }
}
