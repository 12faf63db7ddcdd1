//! One owner for every task the node starts: a [`Shutdown`] is a
//! cancellation signal plus a tracker of the tasks that must end before the
//! process may exit.
//!
//! The node holds the root and hands each component a [`child`]
//! (`Shutdown::child`): the sessions, the HTTP server, the backend's
//! workers, the bus's tasks. A component spawns its tasks on its own child
//! and stops them through its own token, because the components stop in an
//! order (sessions first, then HTTP, then the backend and the bus flush
//! what the sessions queued); the root's [`wait`](Shutdown::wait) waits for
//! every child's tasks, so nothing the node started outlives `run`.
//!
//! [`child`]: Shutdown::child

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A cancellation signal and the tasks that answer to it; see the module
/// docs. Cloning shares both.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
    /// Children, waited for by [`wait`](Self::wait). `std::sync::Mutex`:
    /// pushed to at start-up, copied out before any await.
    children: Arc<Mutex<Vec<Shutdown>>>,
}

impl Shutdown {
    /// A root: nothing cancels it but [`cancel`](Self::cancel).
    pub fn new() -> Self {
        Self::default()
    }

    /// A component's own shutdown: cancelled when this one is (or on its
    /// own), with its own tasks, which this one's [`wait`](Self::wait)
    /// also waits for.
    pub fn child(&self) -> Shutdown {
        let child = Shutdown {
            token: self.token.child_token(),
            tasks: TaskTracker::new(),
            children: Arc::default(),
        };
        self.lock_children().push(child.clone());
        child
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, Vec<Shutdown>> {
        // A list of handles: never inconsistent, ignore poisoning.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `task` as one of this shutdown's tasks.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// The tracker of this shutdown's tasks (for a component that keeps a
    /// tracker token for work that is not a spawned task, like a session
    /// upgraded by axum).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The cancellation signal.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Signals this shutdown and every child.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether [`cancel`](Self::cancel) was called here or on a parent.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// No more tasks are expected here or in any child:
    /// [`wait`](Self::wait) resolves once the running ones have ended. (A
    /// task spawned afterwards is still tracked and waited for.)
    pub fn close(&self) {
        self.tasks.close();
        let children = self.lock_children().clone();
        for child in children {
            child.close();
        }
    }

    /// Resolves when this shutdown's tasks and every child's have ended
    /// (each after its [`close`](Self::close)).
    pub async fn wait(&self) {
        self.tasks.wait().await;
        let children = self.lock_children().clone();
        for child in children {
            Box::pin(child.wait()).await;
        }
    }

    /// Tasks still running here and in every child (for tests and logs).
    pub fn running(&self) -> usize {
        let children = self.lock_children().clone();
        self.tasks.len() + children.iter().map(Shutdown::running).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_root_waits_for_every_child_and_cancels_them() {
        let root = Shutdown::new();
        let child = root.child();
        let grandchild = child.child();
        for s in [&root, &child, &grandchild] {
            let token = s.token().clone();
            s.spawn(async move { token.cancelled().await });
        }
        root.close();
        assert_eq!(root.running(), 3);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), root.wait())
                .await
                .is_err(),
            "waited before the tasks ended"
        );
        root.cancel();
        root.wait().await;
        assert_eq!(root.running(), 0);
        assert!(grandchild.is_cancelled());
    }

    #[tokio::test]
    async fn a_child_cancels_alone() {
        let root = Shutdown::new();
        let child = root.child();
        child.cancel();
        assert!(child.is_cancelled() && !root.is_cancelled());
    }
}
